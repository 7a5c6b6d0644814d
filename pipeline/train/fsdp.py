"""FSDP2: fully_shard per transformer block and at the root; DCP checkpoints that reshard on load.

Only rank 0 reads the pretrained weights; the other ranks build the model on the meta device and
receive their shards from rank 0, so no rank but one ever holds a full copy in host RAM.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipeline.config import TrainConfig
from pipeline.distributed import DistEnv
from pipeline.train.engine import Engine
from pipeline.train.partial import block_modules
from pipeline.unpickling import refuse_untrusted

DCP_FOLDER = "dcp"


def shard_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    kwargs: dict[str, Any] = {"reshard_after_forward": cfg.fsdp.reshard_after_forward}
    if cfg.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.fsdp.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = block_modules(model)
    if cfg.activation_checkpointing:
        blocks = checkpoint_blocks(model, blocks)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def checkpoint_blocks(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Wrap each block in torch's checkpoint_wrapper (non-reentrant), to be sharded as the unit: FSDP's
    hooks then sit outside the recomputed region, so backward re-gathers each block once. The
    wrappers' state_dict and DCP keep the plain parameter names."""
    wanted = {id(block) for block in blocks}
    wrap = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: id(m) in wanted)
    if hasattr(model, "config"):
        model.config.use_cache = False
    return [m for m in model.modules() if isinstance(m, CheckpointWrapper)]


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give meta parameters real (sharded) storage; keep the buffers built on the host."""
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])


class FSDPEngine(Engine):
    format = "dcp"

    def __init__(self, make_model: Callable[[bool], torch.nn.Module], cfg: TrainConfig, dist: DistEnv):
        # make_model(True) loads pretrained weights; make_model(False) builds on the meta device.
        model = make_model(dist.is_main)
        full = model.state_dict() if dist.is_main else {}
        shard_model(model, cfg, dist.device)
        if not dist.is_main:
            materialize(model, dist.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
        del full
        super().__init__(model, cfg, dist)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP's MixedPrecisionPolicy casts instead

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks; our loss is already a share of the global mean.
        (loss * self.dist.world_size).backward()

    def clip_gradients(self) -> torch.Tensor:
        norm = super().clip_gradients()
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def save(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state},
                 storage_writer=dcp.FileSystemWriter(str(folder / DCP_FOLDER)))

    def load(self, folder: Path) -> None:
        refuse_untrusted(folder / DCP_FOLDER)  # DCP unpickles its .metadata file
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder / DCP_FOLDER)))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
