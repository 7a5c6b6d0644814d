"""The one training loop: every strategy runs through it via its engine."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import distributed
from pipeline.context import progress_log
from pipeline.distributed import DistEnv
from pipeline.errors import StagePreempted
from pipeline.preemption import LeadCheck, StopRequest
from pipeline.run_dir import atomic_write_bytes, room_for
from pipeline.train.checkpoint import prune, save_checkpoint, step_dir
from pipeline.train.data import BatchSource
from pipeline.train.engine import TrainEngine, lr_factor
from pipeline.train.held_out import HeldOut, tracked
from pipeline.train.objective import summed_loss
from pipeline.train.step_log import StepLog

log = logging.getLogger("ftpipe.train")


@dataclass
class LoopState:
    step: int = 0
    samples: int = 0  # the global sample offset: where the next step starts in the data stream
    tokens: int = 0
    seconds: float = 0.0
    target_samples: int = 0
    length: dict[str, Any] = field(default_factory=dict)  # the train.max_steps/epochs target_samples is for
    best_loss: float | None = None  # the lowest held-out loss so far (train.eval_every), and its step
    best_step: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        keys = ("step", "samples", "tokens", "seconds", "target_samples", "length", "best_loss", "best_step")
        return cls(**{k: data[k] for k in keys if k in data})


@dataclass
class LoopSettings:
    task: str
    lr: float
    warmup_ratio: float
    checkpoint_every: int
    keep_last: int
    log_every: int
    checkpoint_root: Path
    metrics_file: Path
    ledger_dir: Path | None = None
    dist: DistEnv = field(default_factory=DistEnv)
    progress: bool = True
    stop: StopRequest = field(default_factory=StopRequest)
    lead: LeadCheck = field(default_factory=LeadCheck)
    step_log: StepLog | None = None  # a line per logged step where no progress bar shows
    held_out: HeldOut | None = None  # train.eval_every
    keep_best: bool = False


def run_step(engine: TrainEngine, batches: BatchSource, offset: int, rank: int,
             task: str) -> tuple[float, int, list[int]]:
    """Forward/backward every micro-batch at `offset` for this rank; return (loss share, tokens, rows)."""
    denominator = max(1, batches.global_targets(offset))
    # Summed on the device in float64 and read once per step: a float() per micro-batch would make the
    # host wait for the GPU every time.
    loss_total = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens, rows = 0, []
    for micro in range(batches.layout.grad_accum):
        batch = batches.micro_batch(offset, micro, rank)
        on_device = {k: v.to(engine.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items() if k != "rows"}
        with engine.autocast():
            loss = summed_loss(engine.model, on_device, task) / denominator
        engine.backward(loss)
        loss_total += loss.detach().double()
        tokens += int(batch["attention_mask"].sum())
        rows.extend(int(r) for r in batch["rows"])
    return float(loss_total), tokens, rows


def steps_left(state: LoopState, global_batch: int) -> int:
    return -(-max(0, state.target_samples - state.samples) // global_batch)


def train_loop(engine: TrainEngine, batches: BatchSource, settings: LoopSettings,
               state: LoopState, log: Callable[[dict[str, float], int], None]) -> LoopState:
    """Train until state.samples reaches state.target_samples, checkpointing and logging on the way."""
    global_batch = batches.layout.global_batch
    bar = tqdm(total=state.step + steps_left(state, global_batch), initial=state.step,
               disable=not settings.progress, desc="train", dynamic_ncols=True)
    while state.samples < state.target_samples:
        lr = settings.lr * lr_factor(state.samples, state.target_samples, settings.warmup_ratio, global_batch)
        engine.set_lr(lr)
        started = time.perf_counter()
        loss, tokens, rows = run_step(engine, batches, state.samples, settings.dist.rank, settings.task)
        grad_norm = engine.step()
        loss = distributed.all_reduce_sum(loss)
        _write_ledger(settings, state, rows)
        state.step += 1
        state.samples += global_batch
        state.tokens += int(distributed.all_reduce_sum(tokens))
        state.seconds += time.perf_counter() - started
        settings.lead.step_took(time.perf_counter() - started)
        _record(settings, state, {"loss": loss, "lr": lr, "grad_norm": grad_norm}, log,
                state.step + steps_left(state, global_batch))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        last = state.samples >= state.target_samples
        kept_best = evaluate_now(engine, settings, state, log, last)
        due = state.step % settings.checkpoint_every == 0 or last or kept_best
        if due:
            saving = time.perf_counter()
            checkpoint(engine, settings, state)
            settings.lead.save_took(time.perf_counter() - saving)
        stop_signal = distributed.all_reduce_max(settings.stop.signum or 0)  # any rank's signal stops all
        if stop_signal and state.samples < state.target_samples:
            bar.close()
            stop_here(engine, settings, state, saved=due, signum=stop_signal)
    bar.close()
    return state


def evaluate_now(engine: TrainEngine, settings: LoopSettings, state: LoopState,
                 log: Callable[[dict[str, float], int], None], last: bool) -> bool:
    """Score the held-out split when due (all ranks together); True when train.keep_best wants a
    checkpoint of this step (its loss is the lowest so far)."""
    held = settings.held_out
    if held is None or not held.due(state.step, last):
        return False
    metrics = held.score(engine, settings.dist)  # the same numbers on every rank (reduced exactly)
    if settings.dist.is_main:
        held.record(state.step, metrics)
        log(tracked(metrics), state.step)
    better = state.best_loss is None or metrics["loss"] < state.best_loss
    if better:
        state.best_loss, state.best_step = metrics["loss"], state.step
    return better and settings.keep_best


def stop_here(engine: TrainEngine, settings: LoopSettings, state: LoopState, saved: bool,
              signum: int) -> None:
    """Every rank saves this step together (unless just saved), then the stage stops."""
    folder = step_dir(settings.checkpoint_root, state.step) if saved else checkpoint(engine, settings, state)
    raise StagePreempted(f"train: stopped on {signal.Signals(signum).name} at step {state.step} "
                         f"after writing {folder.name} ({state.samples} of {state.target_samples} samples); "
                         "run again to resume there", signum)


def checkpoint(engine: TrainEngine, settings: LoopSettings, state: LoopState) -> Path:
    folder = save_checkpoint(settings.checkpoint_root, state.step, engine, asdict(state), settings.dist)
    if settings.dist.is_main:
        kept = {state.best_step} if settings.keep_best and state.best_step else set()
        prune(settings.checkpoint_root, settings.keep_last, kept)
    distributed.barrier()
    return folder


def _write_ledger(settings: LoopSettings, state: LoopState, rows: list[int]) -> None:
    if settings.ledger_dir is None:
        return
    settings.ledger_dir.mkdir(parents=True, exist_ok=True)
    line = {"step": state.step + 1, "offset": state.samples, "world_size": settings.dist.world_size,
            "rows": rows}
    path = settings.ledger_dir / f"rank-{settings.dist.rank}.jsonl"
    with room_for(path), open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def _record(settings: LoopSettings, state: LoopState, metrics: dict[str, float],
            log: Callable[[dict[str, float], int], None], total_steps: int) -> None:
    metrics = {**metrics, "tokens_per_second": state.tokens / max(state.seconds, 1e-9)}
    if not settings.dist.is_main:
        return
    with room_for(settings.metrics_file), open(settings.metrics_file, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": state.step, "samples": state.samples, **metrics}) + "\n")
    if state.step % settings.log_every == 0 or state.samples >= state.target_samples:
        log(metrics, state.step)
        if settings.step_log:
            progress_log.info("%s", settings.step_log.line(state.step, total_steps, state.samples, metrics))


def truncate_log(path: Path, last_step: int) -> None:
    """Forget lines logged after the checkpoint a resumed run restarts from, and lines a kill or a full
    disk tore or left NUL-filled mid-append (said in a warning); the rewrite is atomic."""
    if not path.is_file():
        return
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip(b" \t\r\0")]
    records = [_parsed(line) for line in lines]
    torn = sum(record is None for record in records)
    if torn:
        log.warning("%s: dropped %d torn or unreadable line(s) (a crash or a full disk mid-append)",
                    path, torn)
    kept = [line for line, record in zip(lines, records) if record and record["step"] <= last_step]
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))


def _parsed(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def truncate_logs(settings: LoopSettings, last_step: int) -> None:
    """Rank 0 trims the metrics and every rank's ledger (ranks of an earlier world size too)."""
    if settings.dist.is_main:
        truncate_log(settings.metrics_file, last_step)
        if settings.held_out:
            truncate_log(settings.held_out.file, last_step)
        for ledger in sorted(settings.ledger_dir.glob("rank-*.jsonl")) if settings.ledger_dir else []:
            truncate_log(ledger, last_step)
    distributed.barrier()
