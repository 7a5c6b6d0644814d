"""Stage 3 entry point: join the process group, build data and engine, resume, run the loop.

The same function runs in the pipeline's own process (single, or any strategy on one rank) and
in every rank that torchrun starts.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.attention import check_attn_device
from pipeline.config import RunConfig, TrainConfig
from pipeline.context import StageContext
from pipeline.distributed import DistEnv
from pipeline.errors import UserError
from pipeline.eval_metrics import capped
from pipeline.host_memory import keep_freed_memory
from pipeline.precision import trained_precision
from pipeline.preemption import LeadCheck, StopRequest
from pipeline.run_dir import atomic_write_bytes
from pipeline.system_metrics import SystemMetrics
from pipeline.tokenized import open_split
from pipeline.train.build import build_engine
from pipeline.train.checkpoint import load_checkpoint, set_aside, usable_checkpoint
from pipeline.train.data import TrainBatches, batch_layout, collate
from pipeline.train.engine import TrainEngine
from pipeline.train.held_out import HeldOut
from pipeline.train.loop import LoopSettings, LoopState, train_loop, truncate_logs
from pipeline.train.objective import joins_rows
from pipeline.train.prefetch import Prefetcher
from pipeline.train.step_log import StepLog, matmul_peak

log = logging.getLogger("ftpipe")
VERIFY_FILE = "verify.pt"
VERIFY_ROWS = 4


def target_samples(cfg: TrainConfig, num_rows: int, global_batch: int) -> int:
    """Samples the run trains on: max_steps global batches, else `epochs` passes (whole steps)."""
    steps = cfg.max_steps if cfg.max_steps is not None else max(1, int(cfg.epochs * num_rows) // global_batch)
    return steps * global_batch


def training_length(cfg: TrainConfig) -> dict[str, Any]:
    return {"max_steps": cfg.max_steps, "epochs": cfg.epochs}


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Train on the tokenized train split; resume from the latest complete checkpoint."""
    owns_group = cfg.train.strategy != "single" and not distributed.launched_by_torchrun()
    distributed.default_alloc_conf(os.environ)  # before CUDA's first allocation
    with StopRequest().listening() as stop:
        dist = distributed.init(need_group=cfg.train.strategy != "single", device=cfg.train.device,
                                warn_cpu_fallback=True)
        try:
            # Validation on a SLURM login node could not know this node's device.
            check_attn_device(cfg.model.attn_implementation, dist.device.type)
            if dist.device.type == "cpu":
                keep_freed_memory()  # no page faults for the blocks every step frees and allocates again
            with SystemMetrics(ctx.tracker.log_metrics, enabled=dist.is_main):
                return train(cfg, ctx, dist, stop)
        finally:
            if owns_group:
                distributed.shutdown()


def train(cfg: RunConfig, ctx: StageContext, dist: DistEnv, stop: StopRequest) -> dict[str, Any]:
    out = ctx.run_dir.stage("train")
    table = open_split(ctx.run_dir.stage("tokenize") / "train")
    if table.num_rows == 0:
        raise UserError("data.train: the tokenized training split is empty")
    layout = batch_layout(cfg.train, dist.world_size)
    precision, warning = trained_precision(cfg.train, dist.device)
    if warning and dist.is_main:
        log.warning("warning: %s", warning)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"grad_accum": layout.grad_accum, "precision": precision})})
    engine, saved = _engine_at_checkpoint(cfg, dist, out / "checkpoints")
    pad_id = ctx.run_dir.read_manifest("tokenize")["pad_token_id"]
    batches = TrainBatches(table, layout, cfg.train.seed, pad_id, join_rows=joins_rows(engine.model))
    settings = LoopSettings(
        task=cfg.model.task, lr=cfg.train.lr, warmup_ratio=cfg.train.warmup_ratio,
        checkpoint_every=cfg.train.checkpoint_every, keep_last=cfg.train.keep_last,
        log_every=cfg.train.log_every, checkpoint_root=out / "checkpoints",
        metrics_file=out / "metrics.jsonl",
        ledger_dir=out / "ledger" if cfg.train.sample_ledger else None, dist=dist,
        progress=ctx.progress and dist.is_main, stop=stop, lead=_lead_check(cfg, dist),
        step_log=_step_log(engine, cfg, dist, table.num_rows) if dist.is_main and not ctx.progress else None,
        held_out=_held_out(cfg, ctx, pad_id), keep_best=cfg.train.keep_best)

    def target(train: TrainConfig) -> int:
        return target_samples(train, table.num_rows, layout.global_batch)

    fresh = LoopState(target_samples=target(cfg.train), length=training_length(cfg.train))
    state, resumed = _resume(settings, saved, fresh)
    extended = _extend(state, fresh, lambda length: target(cfg.train.model_copy(update=length)))
    with Prefetcher(batches, dist.rank) as ahead:  # the next micro-batches collate while this one computes
        state = train_loop(engine, ahead, settings, state, ctx.tracker.log_metrics)
    memory = peak_memory(ctx, dist)
    write_verify_logits(engine, ctx, out / VERIFY_FILE, dist, precision)
    return {"steps": state.step, "samples": state.samples, "target_samples": state.target_samples,
            "tokens_trained": state.tokens, "seconds": round(state.seconds, 3),
            "tokens_per_second": state.tokens / max(state.seconds, 1e-9), "global_batch": layout.global_batch,
            "world_size": dist.world_size, "strategy": cfg.train.strategy, "precision": precision,
            "resumed_from_step": resumed,
            "trainable_parameters": _parameters(engine, trainable_only=True), **training_length(cfg.train),
            "extended_from": extended, "final_checkpoint": f"checkpoints/step-{state.step:06d}",
            "peak_memory": memory, **_best(state, cfg)}


def _held_out(cfg: RunConfig, ctx: StageContext, pad_id: int) -> HeldOut | None:
    if not cfg.train.eval_every:
        return None
    table = capped(open_split(ctx.run_dir.stage("tokenize") / "eval"), cfg.evaluate.max_rows)
    if table.num_rows == 0:
        raise UserError("train.eval_every: there are no held-out rows; set data.eval or data.eval_fraction")
    return HeldOut(table, cfg.train.eval_every, cfg.evaluate.batch_size, pad_id, cfg.model.task,
                   cfg.model.num_labels, ctx.run_dir.stage("train") / "eval.jsonl")


def _best(state: LoopState, cfg: RunConfig) -> dict[str, Any]:
    if state.best_step is None:
        return {}
    kept = {"best_checkpoint": f"checkpoints/step-{state.best_step:06d}"} if cfg.train.keep_best else {}
    return {"best_step": state.best_step, "best_eval_loss": state.best_loss, **kept}


def peak_memory(ctx: StageContext, dist: DistEnv) -> list[dict[str, Any]]:
    """Every rank's memory peaks (CUDA allocated/reserved, None off CUDA; host RSS), in the manifest
    and as MLflow metrics memory/rank<N>/<what>."""
    ranks = distributed.all_gather_object(distributed.peak_memory(dist.device))
    ctx.tracker.log_metrics({f"memory/rank{rank}/{key}": float(value) for rank, peaks in enumerate(ranks)
                             for key, value in peaks.items() if value is not None})
    return [{"rank": rank, **peaks} for rank, peaks in enumerate(ranks)]


def _engine_at_checkpoint(cfg: RunConfig, dist: DistEnv, root: Path) -> tuple[TrainEngine, dict | None]:
    """The engine, loaded from the latest usable checkpoint (its trainer state too; None to start
    fresh). One that fails to load is set aside and the one before it is tried; a second failure
    stops, since then the cause is likely not in the files."""
    failed: list[str] = []
    while True:
        latest = usable_checkpoint(root, dist)
        distributed.seed_everything(cfg.train.seed)
        engine = build_engine(cfg, dist, latest)
        if latest is None:
            return engine, None
        state, error = _try_load(latest, engine, dist)
        if not distributed.all_reduce_max(int(error is not None)):
            return engine, state
        failed.append(f"{latest} ({error or 'failed on another rank'})")
        if len(failed) > 1:
            raise UserError(f"train: cannot load {' nor '.join(failed)}; check the files and the "
                            f"config (rename a .corrupt checkpoint back to use it again)")
        if dist.is_main:
            set_aside(latest, f"it fails to load: {error or 'failed on another rank'}")
        distributed.barrier()
        del engine


def _try_load(folder: Path, engine: TrainEngine, dist: DistEnv) -> tuple[dict | None, str | None]:
    """load_checkpoint's trainer state, or what a broken file made it raise (in one line)."""
    try:
        return load_checkpoint(folder, engine, dist), None
    except (UserError, torch.OutOfMemoryError, MemoryError):
        raise  # the checkpoint is not at fault
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        return None, f"{type(err).__name__}: {first_line}"


def _lead_check(cfg: RunConfig, dist: DistEnv) -> LeadCheck:
    # Only a SLURM job gets its stop signal signal_lead_seconds ahead; rank 0 speaks for all.
    in_job = "SLURM_JOB_ID" in os.environ and dist.is_main
    return LeadCheck(cfg.launch.slurm.signal_lead_seconds if in_job else None)


def _resume(settings: LoopSettings, saved: dict | None, fresh: LoopState) -> tuple[LoopState, int | None]:
    if saved is None:
        truncate_logs(settings, 0)
        return fresh, None
    state = LoopState.from_dict(saved)
    state.target_samples = state.target_samples or fresh.target_samples
    truncate_logs(settings, state.step)
    return state, state.step


def _extend(state: LoopState, fresh: LoopState, target: Callable[[dict[str, Any]], int]) -> dict | None:
    """Training was extended since the checkpoint (the runner lets only max_steps/epochs grow): train on
    for the samples the longer run adds, at this run's global batch, and recompute the schedule for it."""
    if not state.length or state.length == fresh.length:
        return None
    before = {**state.length, "target_samples": state.target_samples}
    state.target_samples += target(fresh.length) - target(state.length)
    state.length = fresh.length
    return before


def _step_log(engine: TrainEngine, cfg: RunConfig, dist: DistEnv, rows: int) -> StepLog:
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return StepLog(rows, _parameters(engine), matmul_peak(dist.device, dtype), dist.device)


def _parameters(engine: TrainEngine, trainable_only: bool = False) -> int:
    # Global counts: DTensor.numel() is the full size; ZeRO-3 keeps it in ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.unwrapped.parameters()
               if p.requires_grad or not trainable_only)


def verification_batch(ctx: StageContext, rows: int = VERIFY_ROWS) -> dict[str, torch.Tensor]:
    """A few held-out rows (train rows when there is no eval split) to compare logits on."""
    folder = ctx.run_dir.stage("tokenize")
    table = open_split(folder / "eval")
    if table.num_rows == 0:
        table = open_split(folder / "train")
    picked = table.slice(0, rows).column("input_ids").to_pylist()
    return collate(picked, ctx.run_dir.read_manifest("tokenize")["pad_token_id"])


def write_verify_logits(engine: TrainEngine, ctx: StageContext, path: Path, dist: DistEnv,
                        precision: str) -> None:
    """Logits of the trained model as the engine computes them; consolidation must reproduce them."""
    batch = verification_batch(ctx)
    inputs = {k: batch[k].to(dist.device) for k in ("input_ids", "attention_mask")}
    engine.model.eval()
    with torch.no_grad(), engine.autocast():
        logits = engine.model(**inputs).logits.float().cpu()
    engine.model.train()
    if dist.is_main:
        buffer = io.BytesIO()
        torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                    "logits": logits, "precision": precision}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    distributed.barrier()
