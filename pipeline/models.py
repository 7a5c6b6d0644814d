"""Loading models by task, with loading failures turned into one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from pipeline.config import ModelConfig, RunConfig
from pipeline.errors import UserError

MODEL_CLASSES = {"causal_lm": AutoModelForCausalLM,
                 "sequence_classification": AutoModelForSequenceClassification}


def label_kwargs(cfg: ModelConfig, labels: list[str] | None) -> dict:
    if cfg.task != "sequence_classification":
        return {}
    names = labels or [str(i) for i in range(cfg.num_labels or 2)]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def load_model(cfg: ModelConfig, labels: list[str] | None = None, path: str | Path | None = None,
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The pretrained model for cfg.task in `dtype` (fp32: autocast handles bf16), from `path` if given."""
    source = str(path or cfg.name_or_path)
    try:
        model = MODEL_CLASSES[cfg.task].from_pretrained(
            source, dtype=dtype, attn_implementation=cfg.attn_implementation,
            **label_kwargs(cfg, labels))
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot load {source!r} as {cfg.task}: "
                        f"{str(err).splitlines()[0]}") from None
    prepare_pad_token(model)
    return model


def base_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the pretrained weights are loaded in for this run: bf16 for a frozen base under LoRA
    trained in bf16 (half the memory; the adapters train in fp32), else fp32 (autocast casts, and the
    optimizer keeps fp32 weights). Whatever reloads the trained model to reproduce training's logits
    loads it the same way."""
    return torch.bfloat16 if cfg.model.lora is not None and cfg.train.precision == "bf16" else torch.float32


def load_model_config(cfg: ModelConfig, labels: list[str] | None = None):
    return AutoConfig.from_pretrained(cfg.name_or_path, **label_kwargs(cfg, labels))


def prepare_pad_token(model: PreTrainedModel) -> None:
    # Classification heads pick the last non-pad token; they need a pad id even for decoder models.
    config = model.config
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
