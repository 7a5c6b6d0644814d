"""Stage 5: score the consolidated model (and optionally the base model) on the held-out split."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import RunConfig
from pipeline.consolidate import load_consolidated
from pipeline.context import StageContext
from pipeline.distributed import seed_everything
from pipeline.errors import UserError
from pipeline.models import load_model
from pipeline.run_dir import atomic_write_json, atomic_write_text
from pipeline.tokenized import open_split
from pipeline.tokenizer import load_tokenizer
from pipeline.train.data import collate_table
from pipeline.train.objective import summed_loss


def batches(table: pa.Table, batch_size: int, pad_id: int):
    # The training batches' collate: loss on answer tokens only, packed examples kept apart.
    for start in range(0, table.num_rows, batch_size):
        yield collate_table(table.slice(start, batch_size), pad_id)


@torch.no_grad()
def language_model_metrics(model, table: pa.Table, batch_size: int, pad_id: int) -> dict[str, float]:
    total = sum(float(summed_loss(model, b, "causal_lm")) for b in batches(table, batch_size, pad_id))
    targets = int(table.column("num_targets").to_numpy().sum())
    loss = total / max(1, targets)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": targets}


@torch.no_grad()
def classification_metrics(model, table: pa.Table, batch_size: int, pad_id: int,
                           num_labels: int) -> dict[str, Any]:
    truth, predicted = [], []
    for batch in batches(table, batch_size, pad_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted.extend(logits.argmax(-1).tolist())
        truth.extend(batch["labels"].tolist())
    return summarize_predictions(np.array(truth), np.array(predicted), num_labels)


def summarize_predictions(truth: np.ndarray, predicted: np.ndarray, num_labels: int) -> dict[str, Any]:
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros_like(tp), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros_like(tp), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    return {"accuracy": float(tp.sum() / max(1, len(truth))), "macro_f1": float(f1.mean()),
            "confusion_matrix": confusion.tolist(), "eval_examples": int(len(truth))}


def score(model, cfg: RunConfig, table: pa.Table, pad_id: int) -> dict[str, Any]:
    model.eval()
    if cfg.model.task == "causal_lm":
        return language_model_metrics(model, table, cfg.evaluate.batch_size, pad_id)
    return classification_metrics(model, table, cfg.evaluate.batch_size, pad_id, cfg.model.num_labels)


@torch.no_grad()
def generations(model, tokenizer, table: pa.Table, count: int, max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy continuations of a few held-out examples: of their prompt when the loss has a mask
    (the answer is the reference), else of their first half."""
    samples = []
    part = table.slice(0, count)
    masks = part.column("loss_mask").to_pylist() if "loss_mask" in part.column_names else None
    for row, ids in enumerate(part.column("input_ids").to_pylist()):
        if "seq_lens" in part.column_names:  # a packed row: its first example only
            ids = ids[: part.column("seq_lens")[row].as_py()[0]]
        cut = masks[row].index(1) if masks else max(1, len(ids) // 2)
        prompt = torch.tensor([ids[:cut]])
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=model.config.pad_token_id)
        samples.append({"prompt": tokenizer.decode(ids[:cut], skip_special_tokens=True),
                        "reference": tokenizer.decode(ids[cut:], skip_special_tokens=True),
                        "generated": tokenizer.decode(output[0, cut:], skip_special_tokens=True)})
    return samples


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    table = open_split(ctx.run_dir.stage("tokenize") / "eval")
    if table.num_rows == 0:
        raise UserError("data: no held-out rows to evaluate; set data.eval or data.eval_fraction > 0")
    pad_id = ctx.run_dir.read_manifest("tokenize")["pad_token_id"]
    out = ctx.run_dir.stage("evaluate")
    model_dir = ctx.run_dir.model_dir
    model = load_consolidated(cfg, model_dir)  # a full model or base + peft adapter
    metrics = score(model, cfg, table, pad_id)
    if cfg.model.task == "causal_lm" and cfg.evaluate.num_generations:
        samples = generations(model, load_tokenizer(model_dir), table, cfg.evaluate.num_generations,
                              cfg.evaluate.max_new_tokens)
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    if cfg.evaluate.compare_base:
        # Same seed as training, so a fresh classification head starts where training started.
        seed_everything(cfg.train.seed)
        metrics["base"] = score(load_model(cfg.model, cfg.data.labels), cfg, table, pad_id)
    atomic_write_json(ctx.run_dir.metrics_file, metrics)
    ctx.tracker.log_metrics(scalar_metrics(metrics))
    return {"metrics": metrics}


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(scalar_metrics(value, f"{prefix}{key}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat
