"""The `evaluate` section of the run config: held-out scoring and the generations of samples.jsonl."""

from __future__ import annotations

from pydantic import Field

from pipeline.config_errors import Section
from pipeline.config_lm_eval import LmEvalConfig

MAX_BATCH = 65_536  # examples per forward pass, per optimizer step


class EvaluateConfig(Section):
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="Examples per evaluation forward pass.")
    compare_base: bool = Field(
        False, description="Also score the untouched base model (before/after table) and, for causal_lm, "
        "put its generation beside the fine-tuned one in samples.jsonl (generated_base).")
    num_generations: int = Field(
        4, ge=0, le=100_000, description="causal_lm: eval examples continued into samples.jsonl.")
    max_new_tokens: int = Field(32, ge=1, le=1_048_576, description="causal_lm: tokens generated per sample.")
    max_rows: int | None = Field(
        None, ge=1, le=10**15, description="Score only the first max_rows held-out rows (the same rows for "
        "any number of ranks); null: all of them.")
    prompts: str | None = Field(
        None, description="causal_lm: a .txt (one prompt a line) or .jsonl file ({\"prompt\": ..., "
        "\"reference\": ...} or, for data.format chat, {\"messages\": [...]}) continued into samples.jsonl "
        "instead of held-out prompts; chat runs render them with the training chat template.")
    temperature: float = Field(
        0.0, ge=0, le=100, description="causal_lm: 0 generates greedily; above 0 samples (seeded by "
        "train.seed, so the same samples every time).")
    top_p: float = Field(
        1.0, gt=0, le=1, description="causal_lm, temperature > 0: sample from the smallest set of tokens "
        "whose probabilities add up to top_p (1: all tokens).")
    lm_eval: LmEvalConfig | None = Field(
        None, description="lm-evaluation-harness tasks, scored on the consolidated model (and the base "
        "model with compare_base); needs the `eval` extra. null: none.")
