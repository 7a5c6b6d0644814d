"""Stage 3 entry point: build model, data and engine, resume if possible, run the loop."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig, TrainConfig
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.models import load_model
from pipeline.tokenize import open_split
from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.train.data import BatchLayout, TrainBatches
from pipeline.train.engine import SingleEngine
from pipeline.train.loop import LoopSettings, LoopState, train_loop, truncate_metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(cfg: TrainConfig, num_rows: int, global_batch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, int(cfg.epochs * num_rows) // global_batch)


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Train on the tokenized train split; resume from the latest complete checkpoint."""
    out = ctx.run_dir.stage("train")
    table = open_split(ctx.run_dir.stage("tokenize") / "train")
    if table.num_rows == 0:
        raise UserError("data.train: the tokenized training split is empty")
    layout = BatchLayout(cfg.train.micro_batch_size, cfg.train.grad_accum, ctx.world_size)
    steps = total_steps(cfg.train, table.num_rows, layout.global_batch)
    seed_everything(cfg.train.seed)
    model = load_model(cfg.model, cfg.data.labels)
    model.train()
    engine = SingleEngine(model, cfg.train, steps)
    pad_id = ctx.run_dir.read_manifest("tokenize")["pad_token_id"]
    batches = TrainBatches(table, layout, cfg.train.seed, pad_id)
    settings = LoopSettings(
        task=cfg.model.task, total_steps=steps, checkpoint_every=cfg.train.checkpoint_every,
        keep_last=cfg.train.keep_last, log_every=cfg.train.log_every, checkpoint_root=out / "checkpoints",
        metrics_file=out / "metrics.jsonl", rank=ctx.rank, progress=ctx.progress and ctx.is_main)
    state, resumed = _resume(engine, settings, ctx.rank)
    state = train_loop(engine, batches, settings, state, ctx.tracker.log_metrics)
    return {"steps": state.step, "samples": state.samples, "tokens_trained": state.tokens,
            "seconds": round(state.seconds, 3), "tokens_per_second": state.tokens / max(state.seconds, 1e-9),
            "global_batch": layout.global_batch, "world_size": ctx.world_size,
            "resumed_from_step": resumed, "final_checkpoint": f"checkpoints/step-{state.step:06d}"}


def _resume(engine: SingleEngine, settings: LoopSettings, rank: int) -> tuple[LoopState, int | None]:
    latest = latest_checkpoint(settings.checkpoint_root)
    if latest is None:
        truncate_metrics(settings.metrics_file, 0)
        return LoopState(), None
    state = LoopState.from_dict(load_checkpoint(latest, engine, rank))
    truncate_metrics(settings.metrics_file, state.step)
    return state, state.step
