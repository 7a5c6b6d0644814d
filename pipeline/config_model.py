"""The `model` section of the run config: which pretrained model, for which task, trained how (LoRA),
with which attention kernel."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.attention import check_attn_implementation
from pipeline.config_errors import Section

MAX_LABELS = 100_000  # far above any real label set: stops absurd values at validate


class LoraConfig(Section):
    r: int = Field(8, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, le=1e6, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names (or 'all-linear') that get adapters.")
    merge: bool = Field(
        True, description="consolidate: merge adapters into the weights, or save only the adapter.")
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale = alpha / sqrt(r).")
    use_dora: bool = Field(False, description="DoRA: adapters also learn each output row's magnitude.")


class ModelConfig(Section):
    name_or_path: str = Field(description="Local model directory or hub id of the pretrained model.")
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="Head to train: next-token prediction or sequence classification.")
    num_labels: int | None = Field(
        None, ge=2, le=MAX_LABELS,
        description="Classes for sequence_classification; defaults to len(data.labels).")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters (peft) instead of the full model.")
    attn_implementation: str = Field(
        "sdpa", description="Attention kernel passed to from_pretrained: sdpa, eager, flex_attention, "
        "flash_attention_2, flash_attention_3 or a kernels-hub name (org/repo); flash ones need CUDA.")

    @field_validator("attn_implementation")
    @classmethod
    def _attention_runs_here(cls, value: str) -> str:
        return check_attn_implementation(value)
