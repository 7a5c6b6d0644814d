"""Held-out scoring split across ranks: which batches a rank scores, the sums it keeps, and how the
ranks' sums become the metrics that one process scoring every batch would report.

Batch i goes to rank i mod world_size, so every batch is exactly the batch one process scores (same
rows, same padding) and its summed loss is the same number; the ranks then add their sums in float64
(losses, target counts) or int64 (confusion matrices) through pipeline.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.distributed import DistEnv, all_reduce_sum_array
from pipeline.train.data import collate_table
from pipeline.train.objective import attention_backend, model_inputs, summed_loss


def capped(table: pa.Table, max_rows: int | None) -> pa.Table:
    """The first max_rows held-out rows (all when None): the same rows for any world size."""
    return table if max_rows is None else table.slice(0, max_rows)


def rank_batches(table: pa.Table, batch_size: int, pad_id: int,
                 dist: DistEnv) -> Iterator[tuple[pa.Table | None, dict[str, Any]]]:
    """(rows, collated batch) for each batch this rank scores: every world_size-th of one process's.
    Every rank runs as many forward passes (a sharded model needs every rank in each one): a rank
    short of a batch in the last round runs its first one again, with rows None (not counted)."""
    starts = list(range(0, table.num_rows, batch_size))
    rounds = -(-len(starts) // dist.world_size)
    for index in range(dist.rank, rounds * dist.world_size, dist.world_size):
        counted = index < len(starts)
        rows = table.slice(starts[index if counted else dist.rank % max(1, len(starts))], batch_size)
        yield (rows if counted else None), collate_table(rows, pad_id)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    # Only tensors move; ints such as max_length stay Python ints (no device sync in flash kernels).
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def language_model_sums(model: torch.nn.Module, table: pa.Table, batch_size: int, pad_id: int,
                        dist: DistEnv) -> np.ndarray:
    """[summed loss, targets] over this rank's batches, in float64 (targets stay exact below 2**53)."""
    sums = np.zeros(2, dtype=np.float64)
    for rows, batch in rank_batches(table, batch_size, pad_id, dist):
        loss = float(summed_loss(model, to_device(batch, dist.device), "causal_lm"))
        if rows is not None:
            sums += (loss, int(rows.column("num_targets").to_numpy().sum()))
    return sums


def language_model_metrics(sums: np.ndarray) -> dict[str, float]:
    loss = float(sums[0] / max(1.0, sums[1]))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(sums[1])}


def confusion_counts(model: torch.nn.Module, table: pa.Table, batch_size: int, pad_id: int,
                     num_labels: int, dist: DistEnv) -> np.ndarray:
    """This rank's confusion matrix (rows: truth, columns: prediction), int64."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    backend = attention_backend(model)
    for rows, batch in rank_batches(table, batch_size, pad_id, dist):
        logits = model(**model_inputs(to_device(batch, dist.device), backend)).logits
        if rows is not None:
            np.add.at(confusion, (batch["labels"].numpy(), logits.argmax(-1).cpu().numpy()), 1)
    return confusion


def summarize_confusion(confusion: np.ndarray) -> dict[str, Any]:
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    examples = int(confusion.sum())
    return {"accuracy": float(tp.sum() / max(1, examples)), "macro_f1": float(f1.mean()),
            "confusion_matrix": confusion.tolist(), "eval_examples": examples}


def summarize_predictions(truth: np.ndarray, predicted: np.ndarray, num_labels: int) -> dict[str, Any]:
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    return summarize_confusion(confusion)


def scored(model: torch.nn.Module, task: str, table: pa.Table, batch_size: int, pad_id: int,
           num_labels: int | None, dist: DistEnv) -> dict[str, Any]:
    """The metrics of `table` over all ranks: each scores its batches, the sums are added exactly."""
    if task == "causal_lm":
        return language_model_metrics(all_reduce_sum_array(
            language_model_sums(model, table, batch_size, pad_id, dist)))
    assert num_labels is not None, "validation sets model.num_labels for classification"
    return summarize_confusion(all_reduce_sum_array(
        confusion_counts(model, table, batch_size, pad_id, num_labels, dist)))
