"""Summed losses per task; the loop divides by the global target count so that the loss of a
global batch is the same however it is split across micro-batches and ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.attention import is_flash
from pipeline.train.loss_head import loss_head
from pipeline.train.tiled_attention import KEYS as TILE_KEYS
from pipeline.train.tiled_attention import NAME as TILED


def _config(model: torch.nn.Module) -> Any:
    """The model's config, through a DeepSpeed engine's or peft's wrapper (None without one)."""
    return getattr(getattr(model, "module", model), "config", None)


def attention_backend(model: torch.nn.Module) -> str:
    """The attn_implementation the model runs."""
    return getattr(_config(model), "_attn_implementation", None) or "sdpa"


def joins_rows(model: torch.nn.Module) -> bool:
    """Whether packed rows may be trained as one row (train/data.py collate_table): the attention
    keeps examples apart by cu_seq_lens, or by tiles in a model without a sliding window (a window
    shorter than a tile's keys sends a layer back to the L x L mask, which over a joined row would cost
    rows-fold the rows' own)."""
    backend = attention_backend(model)
    if is_flash(backend):
        return True
    config = _config(model)
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return backend == TILED and not windowed


def model_inputs(batch: dict[str, Any], backend: str = "sdpa") -> dict[str, Any]:
    """The forward arguments of a batch. Packed rows (train/data.py packed_inputs) pass restarted
    position_ids, no attention_mask and no cache: transformers then keeps every example to itself
    (an all-ones mask or a cache would silently let examples attend to each other). Flash kernels
    with several rows need the boundaries in the flattened batch as well; tiled sdpa (train/
    tiled_attention.py) its tiles' layout, where collate found that tiles pay."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if is_flash(backend):
        inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                      max_length_q=batch["max_length"], max_length_k=batch["max_length"])
    if backend == TILED:
        inputs.update({key: batch[key] for key in TILE_KEYS if key in batch})
    return inputs


def summed_loss(model: torch.nn.Module, batch: dict[str, Any], task: str) -> torch.Tensor:
    if task == "sequence_classification":
        logits = model(**model_inputs(batch)).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    # No cache in training or loss evaluation: building one costs memory and turns packing detection off.
    inputs = {**model_inputs(batch, attention_backend(model)), "use_cache": False}
    targets = batch["labels"][:, 1:]
    head = loss_head(model)
    if head is not None:  # train.fused_loss: the head returns the summed loss in place of logits
        loss = head.summed(lambda: model(**inputs).logits, targets)
        if loss is not None:
            return loss
    shifted = model(**inputs).logits[:, :-1, :].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
