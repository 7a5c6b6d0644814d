"""Stage 4: the final training checkpoint -> a Hugging Face model directory (safetensors).

The written model is reloaded and its logits compared with the checkpoint's on real rows, so a
directory that loads but computes something else never passes as done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.models import MODEL_CLASSES, load_model, load_tokenizer
from pipeline.run_dir import atomic_dir
from pipeline.tokenize import open_split
from pipeline.train.data import collate
from pipeline.train.engine import full_state_dict

VERIFY_ROWS = 4
VERIFY_ATOL = 1e-4


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    train_manifest = ctx.run_dir.read_manifest("train")
    assert train_manifest is not None, "consolidate runs after train"
    checkpoint = ctx.run_dir.stage("train") / train_manifest["final_checkpoint"]
    model = load_model(cfg.model, cfg.data.labels)
    model.load_state_dict(full_state_dict(checkpoint))
    model.eval()
    target = ctx.run_dir.stage("consolidate") / "model"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        load_tokenizer(cfg.model.name_or_path).save_pretrained(tmp)
        max_diff = verify(model, tmp, cfg, ctx)
    files = sorted(p.name for p in target.iterdir())
    return {"model_dir": "model", "checkpoint": str(checkpoint.relative_to(ctx.run_dir.root)),
            "files": files, "parameters": sum(p.numel() for p in model.parameters()),
            "verify_max_abs_diff": max_diff}


def verify(model: torch.nn.Module, folder: Path, cfg: RunConfig, ctx: StageContext) -> float:
    """Reload `folder` and compare logits with `model` on a few tokenized rows."""
    reloaded = MODEL_CLASSES[cfg.model.task].from_pretrained(str(folder), dtype=torch.float32).eval()
    batch = sample_batch(ctx, VERIFY_ROWS)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        actual = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = float((expected - actual).abs().max())
    if not diff <= VERIFY_ATOL:
        raise RuntimeError(f"consolidated model differs from the checkpoint: max |logit diff| {diff:.3g}")
    return diff


def sample_batch(ctx: StageContext, rows: int) -> dict[str, torch.Tensor]:
    folder = ctx.run_dir.stage("tokenize")
    table = open_split(folder / "eval")
    if table.num_rows == 0:
        table = open_split(folder / "train")
    picked = table.slice(0, rows).column("input_ids").to_pylist()
    return collate(picked, ctx.run_dir.read_manifest("tokenize")["pad_token_id"])
