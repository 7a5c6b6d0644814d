"""The one training loop: every strategy runs through it via its engine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.train.checkpoint import prune, save_checkpoint
from pipeline.train.data import TrainBatches
from pipeline.train.objective import summed_loss


@dataclass
class LoopState:
    step: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        return cls(**{k: data[k] for k in ("step", "samples", "tokens", "seconds")})


@dataclass
class LoopSettings:
    task: str
    total_steps: int
    checkpoint_every: int
    keep_last: int
    log_every: int
    checkpoint_root: Path
    metrics_file: Path
    rank: int = 0
    progress: bool = True


def run_step(engine: Any, batches: TrainBatches, step: int, rank: int, task: str) -> tuple[float, int]:
    """Forward/backward every micro-batch of `step` for this rank; return (loss share, real tokens)."""
    denominator = max(1, batches.global_targets(step))
    loss_total, tokens = 0.0, 0
    for micro in range(batches.layout.grad_accum):
        batch = batches.micro_batch(step, micro, rank)
        with engine.autocast():
            loss = summed_loss(engine.model, batch, task) / denominator
        engine.backward(loss)
        loss_total += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    return loss_total, tokens


def train_loop(engine: Any, batches: TrainBatches, settings: LoopSettings, state: LoopState,
               log: Callable[[dict[str, float], int], None], reduce: Callable[[float], float] = float) -> LoopState:
    """Train from state.step to settings.total_steps, checkpointing and logging on the way."""
    bar = tqdm(total=settings.total_steps, initial=state.step, disable=not settings.progress,
               desc="train", dynamic_ncols=True)
    while state.step < settings.total_steps:
        started = time.perf_counter()
        loss, tokens = run_step(engine, batches, state.step, settings.rank, settings.task)
        grad_norm = engine.step()
        loss = reduce(loss)
        state.step += 1
        state.samples += batches.layout.global_batch
        state.tokens += int(reduce(float(tokens)))
        state.seconds += time.perf_counter() - started
        _record(settings, state, {"loss": loss, "lr": engine.lr, "grad_norm": grad_norm}, log)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if state.step % settings.checkpoint_every == 0 or state.step == settings.total_steps:
            save_checkpoint(settings.checkpoint_root, state.step, engine, asdict(state), settings.rank)
            prune(settings.checkpoint_root, settings.keep_last)
    bar.close()
    return state


def _record(settings: LoopSettings, state: LoopState, metrics: dict[str, float],
            log: Callable[[dict[str, float], int], None]) -> None:
    metrics = {**metrics, "tokens_per_second": state.tokens / max(state.seconds, 1e-9)}
    if settings.rank == 0:
        with open(settings.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": state.step, **metrics}) + "\n")
    if state.step % settings.log_every == 0 or state.step == settings.total_steps:
        log(metrics, state.step)


def truncate_metrics(metrics_file: Path, last_step: int) -> None:
    """Forget metrics logged after the checkpoint a resumed run restarts from."""
    if not metrics_file.is_file():
        return
    kept = [line for line in metrics_file.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    metrics_file.write_text("".join(line + "\n" for line in kept))


def read_losses(metrics_file: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics_file.read_text().splitlines() if line.strip()]
