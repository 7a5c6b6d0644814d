"""Checks that a written model directory computes what the checkpoint it came from computes.

Weights: every checkpoint tensor, cast to the written dtype, must equal the reloaded one (the cast
is the only change writing makes, so this is exact for every dtype). Logits: against the trained
model's own (train/verify.pt); they also prove config, tying and head. A model stored in bf16 or
fp16 computes with rounded weights, so its logits move by rounding: the bound is relative to the
largest logit there (LOGIT_RTOL); fp32 keeps the absolute VERIFY_ATOL. Without verify.pt (or for an
exported earlier step, which has none) a forward pass must run and give finite logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

VERIFY_ATOL = 1e-4  # weights, and fp32 logits: float rounding only
# max |logit diff| / max(1, max |logit|) for weights stored in a 16-bit type. bf16 keeps 8 bits of
# mantissa (relative rounding up to 2^-9 = 0.002 per weight), fp16 11; the errors of many weights
# add up through the layers. Measured with random Llamas (init std 0.02) of 2 to 24 layers: bf16
# 0.6-1.0%, fp16 0.06-0.13%, either under bf16 autocast 0.9-1.4% (up to 3.6% with init std 0.05);
# an unrelated model of the same shape (wrong config, head or tying) is off by 126-131%.
LOGIT_RTOL = {"bf16": 0.1, "fp16": 0.02}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_NAMES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}

Tensors = Iterator[tuple[str, torch.Tensor]]


class ModelMismatch(RuntimeError):
    """The written model does not compute what the checkpoint does."""


def _fail(what: str) -> ModelMismatch:
    return ModelMismatch(f"consolidated model differs from the checkpoint: {what}")


def compare_weights(model: torch.nn.Module, expected: Tensors) -> float:
    """Every checkpoint tensor against the reloaded model's, one at a time."""
    loaded = model.state_dict()
    worst = 0.0
    for name, tensor in expected:
        if name not in loaded or loaded[name].shape != tensor.shape:
            raise _fail(f"{name!r} missing or reshaped")
        if tensor.numel():
            diff = (loaded[name].detach().double() - tensor.detach().double()).abs().max()
            worst = max(worst, float(diff))
    if not worst <= VERIFY_ATOL:
        raise _fail(f"max |weight diff| {worst:.3g}")
    return worst


@torch.no_grad()
def compare_logits(model: torch.nn.Module, verify_file: Path, bf16_autocast: bool, dtype: str) -> float:
    saved = torch.load(verify_file, map_location="cpu", weights_only=True)
    # verify.pt holds the logits as training computed them, so compute them the same way.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    reference = saved["logits"].float()
    diff = float((logits.float() - reference).abs().max())
    bound = logit_bound(reference, dtype, bf16_autocast)
    if not diff <= bound:
        raise _fail(f"max |logit diff| {diff:.3g} (allowed {bound:.3g} for {dtype} weights)")
    return diff


def logit_bound(reference: torch.Tensor, dtype: str, bf16_autocast: bool) -> float:
    """fp32 weights compute exactly what training did; 16-bit ones within rounding, which bf16
    autocast (bf16 activations) makes as coarse as bf16 storage whatever the stored type."""
    if dtype == "fp32":
        return VERIFY_ATOL
    rtol = max(LOGIT_RTOL[dtype], LOGIT_RTOL["bf16"] if bf16_autocast else 0.0)
    return rtol * max(1.0, float(reference.abs().max()))


@torch.no_grad()
def forward_runs(model: torch.nn.Module, vocab_size: int) -> None:
    """A forward pass on a fixed batch gives finite logits of the expected shape."""
    ids = torch.arange(12).remainder(vocab_size).view(2, 6)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if logits.shape[0] != 2 or not torch.isfinite(logits).all():
        raise _fail(f"a forward pass gave {'non-finite' if logits.shape[0] == 2 else 'misshapen'} logits")


def stored_dtypes(folder: Path, files: list[str]) -> set[str]:
    """The safetensors dtypes of the floating-point tensors in `files` (read from their headers)."""
    found = set()
    for name in files:
        if not name.endswith(".safetensors"):
            continue
        with open(folder / name, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"][0] in "FB"}
    return found - {"BOOL"}


def check_stored_dtype(folder: Path, files: list[str], dtype: str) -> None:
    found = stored_dtypes(folder, files)
    if found != {SAFETENSORS_NAMES[dtype]}:
        raise _fail(f"weights stored as {sorted(found)}, expected {SAFETENSORS_NAMES[dtype]}")
