"""Summed losses per task; the loop divides by the global target count so that the loss of a
global batch is the same however it is split across micro-batches and ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward arguments of a batch: packed rows (train/data.py packed_inputs) pass their 4D
    block-diagonal mask and restarted positions, so no example attends to another."""
    if "attention_bias" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_bias"],
                "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def summed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits
    if task == "sequence_classification":
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    shifted = logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
