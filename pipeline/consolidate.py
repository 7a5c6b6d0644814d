"""Stage 4: the final training checkpoint -> a Hugging Face model directory (safetensors).

Tensors stream from the checkpoint reader (any training strategy, no process group) straight into
the shard writer, so memory stays near one tensor, never one model, while writing. LoRA runs are
either merged into plain weights or written as a peft adapter directory (pipeline.lora_out). Full
models are written in consolidate.dtype (auto: the training precision); the tokenizer goes with the
chat template training rendered with, and a classifier's config with its label names.

The written directory is then reloaded as evaluate will load it and checked (pipeline.model_checks):
every tensor against the checkpoint's, and its logits against the trained model's own
(train/verify.pt). A directory that loads but computes something else never passes as done.
`ftpipe export` (pipeline.export) writes any complete checkpoint through the same code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.checkpoint_readers import CheckpointReader, open_checkpoint
from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.hf_writer import WriteResult, write_model_dir
from pipeline.lora_out import adapter_names, is_peft, merged_lora, write_adapter
from pipeline.model_card import CARD, card_text
from pipeline.model_checks import (
    DTYPES,
    check_stored_dtype,
    compare_logits,
    compare_weights,
    forward_runs,
)
from pipeline.models import MODEL_CLASSES, base_dtype, load_model, load_model_config, prepare_pad_token
from pipeline.precision import as_trained
from pipeline.run_dir import RunDir, atomic_dir, room_for
from pipeline.tokenizer import chat_template, load_tokenizer
from pipeline.train.checkpoint import complete_step

Tensors = Iterator[tuple[str, torch.Tensor]]


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    train_manifest = ctx.run_dir.read_manifest("train")
    assert train_manifest is not None, "consolidate runs after train"
    checkpoint, final = chosen_checkpoint(cfg, ctx.run_dir, train_manifest)
    target = ctx.run_dir.model_dir
    # verify.pt holds the final model's logits; another checkpoint is checked by weights and a forward.
    report = write_verified(with_run_labels(as_trained(cfg, ctx.run_dir), ctx.run_dir), checkpoint, target,
                            ctx.run_dir.stage("train") / "verify.pt" if final else None, ctx.run_dir)
    return {"model_dir": target.name, "checkpoint": str(checkpoint.relative_to(ctx.run_dir.root)),
            **report, "seconds": round(time.perf_counter() - start, 3)}


def chosen_checkpoint(cfg: RunConfig, run_dir: RunDir, train_manifest: dict[str, Any]) -> tuple[Path, bool]:
    """consolidate.checkpoint as a folder: final, best (train.keep_best) or step-N; and whether it is
    the final one."""
    train = run_dir.stage("train")
    final = train / train_manifest["final_checkpoint"]
    choice = cfg.consolidate.checkpoint
    if choice == "best":
        if "best_checkpoint" not in train_manifest:
            raise UserError("consolidate.checkpoint: best, but the train stage recorded no best checkpoint "
                            "(it needs train.eval_every and train.keep_best when it runs)")
        chosen = train / train_manifest["best_checkpoint"]
    else:
        step = int(choice.removeprefix("step-")) if choice != "final" else 0
        chosen = final if choice == "final" else complete_step(train / "checkpoints", step,
                                                                f"consolidate.checkpoint: {choice}")
    return chosen, chosen.resolve() == final.resolve()


def write_verified(cfg: RunConfig, checkpoint: Path, target: Path, verify_file: Path | None,
                   run_dir: RunDir | None = None) -> dict[str, Any]:
    """Write `checkpoint` as a model directory at `target` (atomically: all or nothing) and check it;
    `verify_file`: the final model's logits (None for a checkpoint they do not belong to). The model
    card (README.md) describes the training and data of `run_dir`."""
    reader = open_checkpoint(checkpoint)
    adapter = is_peft(reader) and cfg.model.lora is not None and not cfg.model.lora.merge
    dtype = "fp32" if adapter else out_dtype(cfg)
    with room_for(target, lambda: None if adapter else model_bytes(cfg)), atomic_dir(target) as tmp:
        if adapter:
            written = write_adapter(tmp, reader, cfg, training_tokenizer(cfg))
        else:
            written = write_full(tmp, reader, cfg)
        (tmp / CARD).write_text(card_text(cfg, run_dir, adapter, checkpoint), encoding="utf-8")
        check_stored_dtype(tmp, written.files, dtype)
        check = verify(tmp, reader, cfg, verify_file, adapter, dtype)
    return {"format": reader.format, "mode": "adapter" if adapter else "full", "dtype": dtype,
            "files": sorted(p.name for p in target.iterdir()), "weight_files": written.files,
            "parameters": written.parameters, "bytes": written.bytes, **check}


def out_dtype(cfg: RunConfig) -> str:
    return cfg.consolidate.resolved(cfg.train.precision)


def with_run_labels(cfg: RunConfig, run_dir: RunDir) -> RunConfig:
    """cfg with the run's label names: the shard stage's (inferred from the data) or data.labels."""
    if cfg.model.task != "sequence_classification":
        return cfg
    names = (run_dir.read_manifest("shard") or {}).get("labels") or cfg.data.labels
    if not names or names == cfg.data.labels:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": list(names)}),
                                  "model": cfg.model.model_copy(update={"num_labels": len(names)})})


def training_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer training used, with the chat template it rendered with (data.chat_template or
    its own), so that apply_chat_template on the written folder renders what training saw."""
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    template = chat_template(cfg, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


# --- full model (plain or merged LoRA) -------------------------------------------------------


def model_config(cfg: RunConfig):
    config = load_model_config(cfg.model, cfg.data.labels)
    prepare_pad_token(SimpleNamespace(config=config))  # as training saw it: classifiers need a pad id
    config.dtype = DTYPES[out_dtype(cfg)]
    return config


def write_full(folder: Path, reader: CheckpointReader, cfg: RunConfig) -> WriteResult:
    config = model_config(cfg)
    return write_model_dir(folder, model_tensors(reader, cfg, config), config,
                           training_tokenizer(cfg), generation_config(cfg))


def model_bytes(cfg: RunConfig) -> int:
    """What the weights of the full model take in consolidate.dtype (the files, within a few KiB)."""
    with torch.device("meta"):
        skeleton = MODEL_CLASSES[cfg.model.task].from_config(model_config(cfg))
    size = DTYPES[out_dtype(cfg)].itemsize
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size())
               for p in skeleton.parameters())


def generation_config(cfg: RunConfig):
    if cfg.model.task != "causal_lm":
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(cfg.model.name_or_path)
    except OSError:
        return None


def model_tensors(reader: CheckpointReader, cfg: RunConfig, config: Any) -> Tensors:
    """The plain model's tensors in consolidate.dtype, each once: tied aliases dropped, unknown or
    missing keys refused."""
    with torch.device("meta"):
        skeleton = MODEL_CLASSES[cfg.model.task].from_config(config)
    owned = {n for n, _ in skeleton.named_parameters()} | {n for n, _ in skeleton.named_buffers()}
    aliases = set(skeleton.state_dict()) - owned
    source = merged_lora(reader, cfg) if is_peft(reader) else reader.items()
    dtype, seen = out_dtype(cfg), set()
    for name, tensor in source:
        if name in owned:
            seen.add(name)
            yield name, cast(name, tensor, dtype)
        elif name not in aliases:
            raise RuntimeError(f"checkpoint tensor {name!r} is not in {type(skeleton).__name__}")
    missing = {n for n, _ in skeleton.named_parameters()} - seen
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} parameters, e.g. {sorted(missing)[0]!r}")


def cast(name: str, tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """A floating-point tensor in `dtype`; one whose values do not fit (fp16) is refused."""
    if not tensor.is_floating_point() or tensor.dtype == DTYPES[dtype]:
        return tensor
    out = tensor.to(DTYPES[dtype])
    if dtype == "fp16" and not torch.isfinite(out).all() and torch.isfinite(tensor).all():
        raise UserError(f"consolidate.dtype: {name} has values beyond fp16's range "
                        f"(max |x| {float(tensor.abs().max()):.3g}); use bf16 or fp32")
    return out


# --- loading and verification ----------------------------------------------------------------


def is_adapter_dir(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def load_consolidated(cfg: RunConfig, folder: str | Path) -> torch.nn.Module:
    """The consolidated model as evaluate uses it: a plain HF model (with the label names its config
    holds), or the base + peft adapter."""
    if not is_adapter_dir(folder):
        return load_model(cfg.model, saved_labels(folder) or cfg.data.labels, path=folder)
    from peft import PeftModel

    # The base in the dtype training loaded it in (bf16 under LoRA in bf16): its logits are training's.
    base = load_model(cfg.model, cfg.data.labels, dtype=base_dtype(cfg))
    return PeftModel.from_pretrained(base, str(folder))


def saved_labels(folder: str | Path) -> list[str] | None:
    """A written classifier's label names, in id order, from its config.json."""
    id2label = json.loads((Path(folder) / "config.json").read_text()).get("id2label") or {}
    return [id2label[str(i)] for i in range(len(id2label))] if id2label else None


def verify(folder: Path, reader: CheckpointReader, cfg: RunConfig, verify_file: Path | None,
           adapter: bool, dtype: str) -> dict[str, Any]:
    """Weights always (a few rows of logits cannot see, e.g., embedding rows of unused tokens);
    logits too when training left verify.pt, else a forward pass."""
    model = load_consolidated(cfg, folder).eval()
    if adapter:
        expected = reader.items(only=set(adapter_names(reader)))
    else:
        expected = model_tensors(reader, cfg, model.config)
    report: dict[str, Any] = {"verify_max_abs_weight_diff": compare_weights(model, expected)}
    if verify_file is not None and verify_file.is_file():
        diff = compare_logits(model, verify_file, cfg.train.precision == "bf16", dtype)
        return {"verify": "logits+weights", "verify_max_abs_diff": diff, **report}
    forward_runs(model, model.get_input_embeddings().num_embeddings)
    return {"verify": "weights+forward", **report}
