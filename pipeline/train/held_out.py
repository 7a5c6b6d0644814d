"""Scoring the held-out split during training (train.eval_every), on the training ranks with the model
as the engine holds it (DDP, FSDP2 or DeepSpeed shards): the same batches and exact reduction as the
evaluate stage (pipeline/eval_metrics.py), so 2 ranks report what 1 process does. Results go to
train/eval.jsonl, MLflow (eval_loss, eval_accuracy, ... by step) and the best step for train.keep_best."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pipeline.distributed import DistEnv
from pipeline.eval_metrics import scored
from pipeline.run_dir import room_for
from pipeline.train.engine import TrainEngine

SCALARS = ("loss", "perplexity", "accuracy", "macro_f1")


@dataclass
class HeldOut:
    table: pa.Table
    every: int
    batch_size: int
    pad_id: int
    task: str
    num_labels: int | None
    file: Path  # train/eval.jsonl

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def score(self, engine: TrainEngine, dist: DistEnv) -> dict[str, float]:
        """The held-out metrics of the model as it is now (every rank calls this together)."""
        with torch.no_grad(), engine.autocast():
            metrics = scored(engine.model, self.task, self.table, self.batch_size, self.pad_id,
                             self.num_labels, dist)
        return {key: float(metrics[key]) for key in SCALARS if key in metrics}

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0: one line per scoring in train/eval.jsonl (a resumed run trims lines after its step)."""
        with room_for(self.file), open(self.file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")


def tracked(metrics: dict[str, Any]) -> dict[str, float]:
    """The names they get in MLflow, beside the training loss."""
    return {f"eval_{key}": value for key, value in metrics.items()}
