"""The `consolidate` section of the run config: what the model that leaves the run is stored as."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config_errors import Section

Precision = Literal["fp32", "bf16"]


class ConsolidateConfig(Section):
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Floating-point type of the consolidated (and exported) model's weights; auto: "
        "the precision trained in (train.precision). LoRA adapter folders stay fp32.")

    checkpoint: str = Field(
        "final", pattern=r"^(final|best|step-[0-9]+)$",
        description="Which complete checkpoint becomes the model: final, best (by held-out loss; needs "
        "train.keep_best) or step-N.")

    def resolved(self, precision: Precision) -> str:
        """bf16, fp16 or fp32: `dtype`, with auto read as the training precision."""
        return precision if self.dtype == "auto" else self.dtype
