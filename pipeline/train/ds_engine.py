"""DeepSpeed ZeRO engine: the TrainEngine interface (see engine.py) over deepspeed.initialize.

Accumulation follows the loop, not DeepSpeed: backward() gets this rank's share of the global
mean, so the engine undoes DeepSpeed's two averagings (over accumulation steps and over ranks)
and the optimizer steps exactly once per step() call, with our own AdamW and learning rate.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.config import RunConfig
from pipeline.distributed import DistEnv
from pipeline.errors import UserError
from pipeline.train.engine import build_optimizer
from pipeline.unpickling import make_private, refuse_untrusted

TAG = "deepspeed"
UNIVERSAL = "deepspeed_universal"
AUTO = "auto"
# Quiet by default: DeepSpeed otherwise prints a progress line every 10 steps.
QUIET = {"steps_per_print": 1_000_000_000, "wall_clock_breakdown": False}


def build_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run: the JSON file or the deepspeed fields, "auto" filled in."""
    ds = cfg.train.deepspeed
    source = ds.config or "train.deepspeed"
    config = _read_json(Path(ds.config)) if ds.config else {}
    _reject_sections(config, source)
    for key, value, origin, strict in _zero_values(cfg):
        if _get(config, key) in (None, AUTO):
            if value != "none":  # an absent offload section already means none
                _set(config, key, value)
        elif strict:
            _fill(config, key, value, origin, source)
    for key, value, origin in _run_values(cfg, world_size):
        _fill(config, key, value, origin, source)
    for key, value in _bucket_values(cfg).items():
        if _get(config, key) in (None, AUTO):
            _set(config, key, value)
    if _get(config, "fp16.enabled") is True:
        raise UserError(f"{source}: fp16.enabled is true but ftpipe supports only "
                        "train.precision fp32 or bf16")
    _fill(config, "fp16.enabled", False, "train.precision", source)
    # Our AdamW on CPU-offloaded shards gives the same updates as every other strategy.
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    for key, value in QUIET.items():
        config.setdefault(key, value)
    return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read DeepSpeed config: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON in DeepSpeed config: {err.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def _reject_sections(config: dict[str, Any], source: str) -> None:
    # One source of truth: the loop owns the schedule and engine.build_optimizer the optimizer.
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UserError(f"{source}: remove the '{section}' section; ftpipe uses its own AdamW "
                            f"and schedule (set train.lr, train.weight_decay, train.warmup_ratio)")


def _zero_values(cfg: RunConfig) -> list[tuple[str, Any, str, bool]]:
    """(key, value, origin, strict): with a JSON file only fields the user set must agree with it."""
    ds = cfg.train.deepspeed
    values = [("zero_optimization.stage", ds.zero_stage, "zero_stage"),
              ("zero_optimization.offload_optimizer.device", ds.offload_optimizer, "offload_optimizer"),
              ("zero_optimization.offload_param.device", ds.offload_params, "offload_params")]
    return [(key, value, f"train.deepspeed.{name}", not ds.config or name in ds.model_fields_set)
            for key, value, name in values]


def _run_values(cfg: RunConfig, world_size: int) -> list[tuple[str, Any, str]]:
    train = cfg.train
    return [("train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size"),
            ("gradient_accumulation_steps", train.grad_accum, "train.grad_accum"),
            ("train_batch_size", train.micro_batch_size * train.grad_accum * world_size,
             f"train.micro_batch_size * train.grad_accum * {world_size} ranks"),
            ("gradient_clipping", float(train.max_grad_norm or 0.0), "train.max_grad_norm"),
            ("bf16.enabled", train.precision == "bf16",
             f"train.precision {train.precision!r}, so bf16.enabled")]


def _bucket_values(cfg: RunConfig) -> dict[str, int]:
    """Communication buckets sized from the model, where the file leaves them out or "auto".

    DeepSpeed's defaults (5e8 elements) are meant for multi-billion models: for smaller ones the
    buckets alone outweigh a rank's share of the model state.
    """
    hidden = _hidden_size(cfg)
    return {"zero_optimization.reduce_bucket_size": hidden * hidden,
            "zero_optimization.allgather_bucket_size": hidden * hidden,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
            "zero_optimization.stage3_max_live_parameters": hidden * hidden * 4,
            "zero_optimization.stage3_max_reuse_distance": hidden * hidden * 4}


def _hidden_size(cfg: RunConfig) -> int:
    try:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(cfg.model.name_or_path)
    except (OSError, ValueError):
        return 4096
    return int(getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", 4096))


def _fill(config: dict[str, Any], key: str, value: Any, origin: str, source: str) -> None:
    """Set an absent or "auto" key; an explicit value must agree with the run config."""
    current = _get(config, key)
    if current is None or current == AUTO:
        _set(config, key, value)
    elif not _same(current, value):
        raise UserError(f"{source}: {key} is {json.dumps(current)} but {origin} is {json.dumps(value)}")


def _same(current: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(current, bool):
        return current is value
    if isinstance(value, (int, float)) and isinstance(current, (int, float)):
        return float(current) == float(value)
    return current == value


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def saved_world_size(folder: Path) -> int:
    """Ranks that wrote the checkpoint in `folder`: meta.json, else its per-rank optimizer shards."""
    meta = folder / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["world_size"])
    shards = list((folder / TAG).glob("zero_pp_rank_*_optim_states.pt"))
    if not shards:
        raise UserError(f"{folder}: no DeepSpeed checkpoint under {TAG}/")
    return len(shards)


def _client_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # foreach as before: ZeRO swaps in its own flat partitions and steps the optimizer itself.
    optimizer = build_optimizer(model, cfg.train, fused=False)
    # zero.Init already flattened parameters to empty 1-d shards, so build_optimizer's ndim test
    # would put every matrix in the no-decay group: regroup by the real shape (ds_shape).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ndims = [len(getattr(p, "ds_shape", p.shape)) for p in params]
    decay, plain = optimizer.param_groups
    decay["params"] = [p for p, n in zip(params, ndims) if n >= 2]
    plain["params"] = [p for p, n in zip(params, ndims) if n < 2]
    return optimizer


class DeepSpeedEngine:
    """ZeRO stage 1/2/3 (optionally CPU offload) as a TrainEngine."""

    format = "deepspeed"

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def __init__(self, cfg: RunConfig, dist: DistEnv, make_model: Callable[[], torch.nn.Module],
                 resume_from: Path | None = None):
        if not dist.initialized:
            raise RuntimeError("DeepSpeedEngine needs a process group: call pipeline.distributed.init(True)")
        import deepspeed

        self.cfg, self.dist = cfg, dist
        self.config = build_ds_config(cfg, dist.world_size)
        self.universal = resume_from is not None and saved_world_size(resume_from) != dist.world_size
        if self.universal:
            # Another world size: only DeepSpeed's universal format reshards, and only when
            # the engine is initialised for it.
            self.config.setdefault("checkpoint", {})["load_universal"] = True
        # deepspeed.comm wraps the group pipeline.distributed made (it creates none); zero.Init
        # needs that before deepspeed.initialize, or its config sees world size 1.
        deepspeed.init_distributed(dist_backend=distributed.backend_name(), dist_init_required=False)
        module = self._make(make_model)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=_client_optimizer(module, cfg), config=copy.deepcopy(self.config),
            dist_init_required=False)
        self._weight_decay = [group["weight_decay"] for group in self.model.optimizer.param_groups]

    def _make(self, make_model: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        if self.zero_stage != 3:
            self._hf_config = None
            return make_model()
        from transformers.integrations import HfDeepSpeedConfig

        # Held for the engine's life: transformers reads it through a weak reference, and
        # from_pretrained then loads each weight straight into zero.Init shards.
        self._hf_config = HfDeepSpeedConfig(copy.deepcopy(self.config))
        return make_model()

    @property
    def zero_stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def autocast(self) -> contextlib.AbstractContextManager:
        # With bf16 DeepSpeed holds the module in bf16 itself (fp32 master weights in the optimizer).
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already a share of the global mean: no division by the accumulation steps,
        # and a factor world_size undoes DeepSpeed's average over data-parallel ranks.
        self.model.backward(loss * self.dist.world_size, scale_wrt_gas=False)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # only advances DeepSpeed's micro-step counter

    def step(self) -> float:
        if not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError(f"step() after fewer than {self.cfg.train.grad_accum} backward() calls")
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def set_lr(self, lr: float) -> None:
        for group in self.model.optimizer.param_groups:
            group["lr"] = lr

    def save(self, folder: Path) -> None:
        # Every rank writes its shards; no 'latest' pointer (checkpoint.py scans COMPLETE markers).
        self.model.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        for part in (TAG, UNIVERSAL):  # DeepSpeed's loader and converter unpickle every file there
            if (folder / part).is_dir():
                refuse_untrusted(folder / part)
        if not self.universal and saved_world_size(folder) != self.dist.world_size:
            raise RuntimeError(f"{folder}: saved by another world size; pass it as resume_from")
        source = self._universal_folder(folder) if self.universal else folder
        path, _ = self.model.load_checkpoint(str(source), tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"{source}: DeepSpeed found no checkpoint under tag {TAG!r}")
        self._repair_optimizer()

    def _repair_optimizer(self) -> None:
        """Undo two things ZeRO-3's universal loader does to the optimizer it restores."""
        # It copies the first group's settings onto every group: weight decay on norms and biases.
        for group, decay in zip(self.model.optimizer.param_groups, self._weight_decay):
            group["weight_decay"] = decay
        # It hands every group one shared 'step' tensor, which AdamW then advances once per group
        # and step, skewing the bias correction of all groups but the first.
        for state in self.model.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _universal_folder(self, folder: Path) -> Path:
        """folder/deepspeed_universal, converted once by rank 0; the original stays as it is."""
        target = folder / UNIVERSAL
        error = None
        if self.dist.is_main and not target.is_dir():
            error = _convert_to_universal(folder / TAG, target)
        error = distributed.broadcast_object(error)
        if error:
            raise RuntimeError(error)
        return target

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "world_size": self.dist.world_size,
                "zero_stage": self.zero_stage, "tag": TAG}


def _convert_to_universal(source: Path, target: Path) -> str | None:
    """Run ds_to_universal into a temp folder renamed into place; an error message or None."""
    # uuid, not the pid: pids of two hosts writing one shared filesystem can be equal.
    temp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    # A subprocess: the converter forks workers and prints a lot, neither welcome in a rank.
    # --inject_missing_state: for ZeRO-1/2 it wants a Megatron-only 'universal_checkpoint_info'
    # entry; the flag supplies it in memory and never rewrites the source files.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(temp / TAG), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(temp, ignore_errors=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"{source}: converting to a universal checkpoint failed: {tail[0]}"
    make_private(temp)
    temp.rename(target)
    return None
