"""The model card: README.md in the consolidated (or exported) model folder.

Written with the folder, before evaluation: the base model, the task, a summary of how it was trained,
the data sources with their row counts (the shard manifest), the prompt format; the evaluate stage then
fills in its metrics (before/after with evaluate.compare_base) between the markers below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import RunConfig, inline_template
from pipeline.run_dir import RunDir, atomic_write_text

CARD = "README.md"
METRICS_START, METRICS_END = "<!-- ftpipe:metrics -->", "<!-- /ftpipe:metrics -->"
NOT_EVALUATED = "Not evaluated yet: the evaluate stage writes its metrics here."


def card_text(cfg: RunConfig, run_dir: RunDir | None, adapter: bool, checkpoint: Path) -> str:
    """The card of a model folder written from `checkpoint` of `run_dir`'s training (None: no run
    directory to read)."""
    train = (run_dir.read_manifest("train") if run_dir else None) or {}
    step = re.fullmatch(r"step-0*(\d+)", checkpoint.name)
    train = {**train, "steps": int(step.group(1))} if step else train
    shard = (run_dir.read_manifest("shard") if run_dir else None) or {}
    front = ["---", f"base_model: {json.dumps(cfg.model.name_or_path)}",
             f"library_name: {'peft' if adapter else 'transformers'}", "tags: [ftpipe]", "---"]
    return "\n".join(front + [
        f"# {cfg.name}", "",
        f"`{cfg.model.name_or_path}` fine-tuned for {cfg.model.task} with ftpipe {pipeline.__version__}"
        f" ({'a LoRA adapter' if adapter else 'full weights'}).", "",
        "## Training", "", *_table(["setting", "value"], _training_rows(cfg, train)), "",
        "## Data", "", *_table(["source", "rows", "rejected"], _source_rows(shard)), "",
        *_split_line(shard),
        "## Prompt format", "", _prompt_format(cfg), "",
        "## Evaluation", "", METRICS_START, NOT_EVALUATED, METRICS_END, ""])


def _training_rows(cfg: RunConfig, train: dict[str, Any]) -> list[list[Any]]:
    lora = cfg.model.lora
    rows = [["strategy", cfg.train.strategy], ["precision", train.get("precision", cfg.train.precision)],
            ["steps", train.get("steps", "?")], ["global batch", train.get("global_batch", "?")],
            ["learning rate", cfg.train.lr], ["max_seq_len", cfg.data.max_seq_len],
            ["packing", cfg.data.packing], ["seed", cfg.train.seed]]
    if lora is not None:
        rows.append(["LoRA", f"r={lora.r} alpha={lora.alpha} dropout={lora.dropout} "
                             f"targets={lora.target_modules} merged={lora.merge}"])
    return rows


def _source_rows(shard: dict[str, Any]) -> list[list[Any]]:
    sources = shard.get("sources") or []
    return [[f"`{s.get('path', '?')}`", s.get("rows", "?"), s.get("rejected", 0)] for s in sources] \
        or [["(no shard manifest)", "?", "?"]]


def _split_line(shard: dict[str, Any]) -> list[str]:
    splits = shard.get("splits") or {}
    if not splits:
        return []
    return [", ".join(f"{name}: {split.get('rows', '?')} rows" for name, split in splits.items()), ""]


def _prompt_format(cfg: RunConfig) -> str:
    text = f"data.format `{cfg.data.format}`, loss on `{cfg.data.loss_on or 'default'}`."
    if cfg.data.format != "chat":
        return text + " No chat template: prompts are plain text as in training."
    template = cfg.data.chat_template
    source = ("`data.chat_template`, inline" if template and inline_template(template)
              else template or "the base tokenizer's own")
    return (text + f" Chat template ({source}) saved with the tokenizer: render prompts with "
            "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def add_metrics(folder: Path, metrics: dict[str, Any]) -> Path | None:
    """Put `metrics` (and metrics["base"]) into the card's evaluation section, atomically; the card,
    or None when the folder has none (consolidated before cards existed)."""
    card = folder / CARD
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    start, end = text.find(METRICS_START), text.find(METRICS_END)
    if start < 0 or end < start:
        return None
    atomic_write_text(card, text[:start + len(METRICS_START)] + "\n" + "\n".join(_metric_lines(metrics))
                      + "\n" + text[end:])
    return card


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    base = metrics.get("base") or {}
    names = [k for k, v in metrics.items() if _scalar(v)]
    if base:
        rows = [[k, _shown(base.get(k)), _shown(metrics[k])] for k in names]
        return _table(["metric", "base model", "fine-tuned"], rows)
    return _table(["metric", "fine-tuned"], [[k, _shown(metrics[k])] for k in names])


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
