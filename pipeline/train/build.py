"""Build the engine for train.strategy: load the model the way the strategy needs, prepare it
(LoRA, freezing, activation checkpointing), then wrap it from outside."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.distributed import DistEnv
from pipeline.models import MODEL_CLASSES, base_dtype, load_model, load_model_config, prepare_pad_token
from pipeline.train.engine import DDPEngine, SingleEngine, TrainEngine
from pipeline.train.loss_head import install_loss_head, liger_available, loss_kind
from pipeline.train.partial import prepare_model
from pipeline.train.tiled_attention import use_tiled_attention


def pretrained(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    model = prepare_model(load_model(cfg.model, cfg.data.labels, dtype=base_dtype(cfg)).to(device), cfg)
    return with_train_kernels(model, cfg)


def with_train_kernels(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """train.fused_loss for causal LMs and tiled attention for packed rows, both installed before any
    wrapping (see loss_head.py and tiled_attention.py)."""
    if cfg.data.packing:
        use_tiled_attention(model)
    return install_loss_head(model, cfg.train.fused_loss) if cfg.model.task == "causal_lm" else model


def skeleton(cfg: RunConfig) -> torch.nn.Module:
    """The model's structure with parameters on the meta device (buffers real): no weights read."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = MODEL_CLASSES[cfg.model.task].from_config(load_model_config(cfg.model, cfg.data.labels),
                                                          dtype=base_dtype(cfg))
    model.tie_weights()  # init_empty_weights re-registers parameters, which unties them
    prepare_pad_token(model)
    with init_empty_weights(include_buffers=False):
        return with_train_kernels(prepare_model(model, cfg), cfg)


def build_engine(cfg: RunConfig, dist: DistEnv, resume_from: Path | None = None) -> TrainEngine:
    strategy = cfg.train.strategy
    if cfg.model.task == "causal_lm":  # train.fused_loss: on fails here, before any weight is read
        loss_kind(cfg.train.fused_loss, dist.device.type, plain_linear=True, liger=liger_available())
    if strategy == "single":
        return SingleEngine(pretrained(cfg, dist.device), cfg.train, dist)
    if strategy == "ddp":
        return DDPEngine(pretrained(cfg, dist.device), cfg.train, dist)
    if strategy == "fsdp":
        from pipeline.train.fsdp import FSDPEngine

        return FSDPEngine(lambda real: pretrained(cfg, dist.device) if real else skeleton(cfg),
                          cfg.train, dist)
    from pipeline.train.ds_engine import DeepSpeedEngine

    return DeepSpeedEngine(cfg, dist, lambda: pretrained(cfg, torch.device("cpu")), resume_from)
