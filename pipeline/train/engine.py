"""Engines own model and optimizer for one strategy; the loop only calls them.

Every engine satisfies TrainEngine, which is what keeps one training loop for all strategies.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainConfig
from pipeline.distributed import DistEnv

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"


@runtime_checkable
class TrainEngine(Protocol):
    """What the loop, checkpointing and the train stage use of an engine; nothing else may be assumed."""

    model: torch.nn.Module  # the wrapped model that forward passes go through

    @property
    def device(self) -> torch.device: ...

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without the strategy's wrapper (parameters may still be sharded)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: bf16 autocast, or nothing where the strategy casts itself."""

    def backward(self, loss: torch.Tensor) -> None:
        """Once per micro-batch; `loss` is this rank's share of the global-batch mean, so summing
        gradients over micro-batches and ranks gives the global gradient."""

    def step(self) -> float:
        """Clip, apply the optimizer, clear gradients; the pre-clip global grad norm."""

    def set_lr(self, lr: float) -> None:
        """The loop computes the schedule from the global sample offset."""

    def save(self, folder: Path) -> None:
        """Called by every rank on one shared folder."""

    def load(self, folder: Path) -> None:
        """Called by every rank on one shared folder."""

    def describe(self) -> dict[str, Any]:
        """What consolidation needs to know about the checkpoint format (written to meta.json)."""


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; biases and norm weights (1-d tensors) get no weight decay.
    Fused (one kernel per step over all tensors) where torch has the kernel for the parameters'
    device (CPU and CUDA), else foreach."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    settings = {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if fused:
        try:
            return torch.optim.AdamW(groups, **settings, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(groups, **settings, foreach=True)


def lr_factor(samples: int, target_samples: int, warmup_ratio: float, global_batch: int = 1) -> float:
    """Linear warmup, then cosine decay to zero, as a function of the samples trained so far.

    Samples, not steps: a run resumed at another world size (another global batch) keeps the
    same schedule over the data.
    """
    warmup = target_samples * warmup_ratio
    if samples < warmup:
        return min(1.0, (samples + global_batch) / warmup)
    progress = (samples - warmup) / max(1.0, target_samples - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Engine:
    """Shared behaviour; subclasses wrap the model for their strategy."""

    format = "torch"

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, dist: DistEnv):
        self.model = model
        self.cfg = cfg
        self.dist = dist
        self.optimizer = build_optimizer(model, cfg)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm or float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model

    def save(self, folder: Path) -> None:
        # Every rank holds the full state; rank 0 writes it, weights apart so consolidation can
        # memory-map them without touching the optimizer state.
        if self.dist.is_main:
            torch.save(self.unwrapped.state_dict(), folder / MODEL_FILE)
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        weights = torch.load(folder / MODEL_FILE, map_location=self.device, weights_only=True, mmap=True)
        self.unwrapped.load_state_dict(weights)
        self.optimizer.load_state_dict(
            torch.load(folder / OPTIMIZER_FILE, map_location=self.device, weights_only=True))

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "world_size": self.dist.world_size}


class SingleEngine(Engine):
    """One process, CPU or one GPU."""


class DDPEngine(Engine):
    """Data parallel: full replicas, gradients all-reduced in backward."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, dist: DistEnv):
        super().__init__(model, cfg, dist)
        device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; our loss is already a share of the global mean.
        (loss * self.dist.world_size).backward()

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model.module
