"""Stage 4: the final training checkpoint -> a Hugging Face model directory (safetensors).

Tensors stream from the checkpoint reader (any training strategy, no process group) straight into
the shard writer, so memory stays near one tensor, never one model, while writing. LoRA runs are
either merged into plain weights (W + B @ A * alpha / r) or written as a peft adapter directory.

The written directory is then reloaded as evaluate will load it and checked: its logits against
the trained model's own (train/verify.pt), or, without verify.pt, every loaded tensor against the
checkpoint's. A directory that loads but computes something else never passes as done.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.checkpoint_readers import CheckpointReader, open_checkpoint
from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.hf_writer import ShardedSafetensorsWriter, WriteResult, write_model_dir
from pipeline.models import MODEL_CLASSES, base_dtype, load_model, load_model_config, prepare_pad_token
from pipeline.run_dir import atomic_dir, room_for
from pipeline.tokenizer import load_tokenizer

VERIFY_ATOL = 1e-4
BF16_MERGED_RTOL = 2.0**-6  # two bf16 rounding steps, relative to the largest logit
PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")

Tensors = Iterator[tuple[str, torch.Tensor]]


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    start = time.perf_counter()
    train_manifest = ctx.run_dir.read_manifest("train")
    assert train_manifest is not None, "consolidate runs after train"
    checkpoint = ctx.run_dir.stage("train") / train_manifest["final_checkpoint"]
    reader = open_checkpoint(checkpoint)
    adapter = is_peft(reader) and cfg.model.lora is not None and not cfg.model.lora.merge
    target = ctx.run_dir.model_dir
    with room_for(target, lambda: None if adapter else model_bytes(cfg)), atomic_dir(target) as tmp:
        written = (write_adapter if adapter else write_full)(tmp, reader, cfg)
        check = verify(tmp, reader, cfg, ctx.run_dir.stage("train") / "verify.pt", adapter)
    return {"model_dir": target.name, "checkpoint": str(checkpoint.relative_to(ctx.run_dir.root)),
            "format": reader.format, "mode": "adapter" if adapter else "full",
            "files": sorted(p.name for p in target.iterdir()), "weight_files": written.files,
            "parameters": written.parameters, "bytes": written.bytes, **check,
            "seconds": round(time.perf_counter() - start, 3)}


def is_peft(reader: CheckpointReader) -> bool:
    return any(k.startswith(PEFT_PREFIX) and any(p in k for p in _LORA_PARTS) for k in reader.keys())


# --- full model (plain or merged LoRA) -------------------------------------------------------


def model_config(cfg: RunConfig):
    config = load_model_config(cfg.model, cfg.data.labels)
    prepare_pad_token(SimpleNamespace(config=config))  # as training saw it: classifiers need a pad id
    config.dtype = torch.float32  # what the checkpoints hold (fp32 master weights)
    return config


def write_full(folder: Path, reader: CheckpointReader, cfg: RunConfig) -> WriteResult:
    config = model_config(cfg)
    return write_model_dir(folder, model_tensors(reader, cfg, config), config,
                           load_tokenizer(cfg.model.name_or_path), generation_config(cfg))


def model_bytes(cfg: RunConfig) -> int:
    """What the fp32 weights of the full model take (the files written, within a few KiB)."""
    with torch.device("meta"):
        skeleton = MODEL_CLASSES[cfg.model.task].from_config(model_config(cfg))
    return 4 * sum(p.numel() for p in skeleton.parameters())


def generation_config(cfg: RunConfig):
    if cfg.model.task != "causal_lm":
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(cfg.model.name_or_path)
    except OSError:
        return None


def model_tensors(reader: CheckpointReader, cfg: RunConfig, config: Any) -> Tensors:
    """The plain model's tensors, each once: tied aliases dropped, unknown or missing keys refused."""
    with torch.device("meta"):
        skeleton = MODEL_CLASSES[cfg.model.task].from_config(config)
    owned = {n for n, _ in skeleton.named_parameters()} | {n for n, _ in skeleton.named_buffers()}
    aliases = set(skeleton.state_dict()) - owned
    source = merged_lora(reader, cfg) if is_peft(reader) else reader.items()
    seen = set()
    for name, tensor in source:
        if name in owned:
            seen.add(name)
            yield name, tensor
        elif name not in aliases:
            raise RuntimeError(f"checkpoint tensor {name!r} is not in {type(skeleton).__name__}")
    missing = {n for n, _ in skeleton.named_parameters()} - seen
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} parameters, e.g. {sorted(missing)[0]!r}")


def merged_lora(reader: CheckpointReader, cfg: RunConfig) -> Tensors:
    """Base weights with their adapters folded in; modules_to_save replace the originals."""
    if cfg.model.lora is None:
        raise RuntimeError("the checkpoint holds LoRA adapters but model.lora is not set")
    scale = cfg.model.lora.alpha / cfg.model.lora.r
    small = {n for n in reader.keys() if any(p in n for p in _LORA_PARTS)}
    adapters = dict(reader.items(only=small))  # a first pass over the small tensors only
    for name, tensor in reader.items():
        if name in small or ".original_module." in name:
            continue
        plain = name.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", ".")
        if ".base_layer." in plain:
            module, _, leaf = plain.partition(".base_layer.")
            plain = f"{module}.{leaf}"
            if leaf == "weight":
                tensor = _merge(tensor, f"{PEFT_PREFIX}{module}", adapters, scale)
        yield plain, tensor


def _merge(weight: torch.Tensor, module: str, adapters: dict[str, torch.Tensor],
           scale: float) -> torch.Tensor:
    if f"{module}.lora_A.default.weight" in adapters:
        a, b = adapters[f"{module}.lora_A.default.weight"], adapters[f"{module}.lora_B.default.weight"]
        delta = b.float() @ a.float()
    elif f"{module}.lora_embedding_A.default" in adapters:
        a, b = adapters[f"{module}.lora_embedding_A.default"], adapters[f"{module}.lora_embedding_B.default"]
        delta = (b.float() @ a.float()).T
    else:
        return weight
    return (weight.float() + delta * scale).to(weight.dtype)


# --- peft adapter directory ------------------------------------------------------------------


def adapter_names(reader: CheckpointReader) -> dict[str, str]:
    """Checkpoint key -> the key peft saves (adapter name dropped, modules_to_save flattened)."""
    out = {}
    for name in reader.keys():
        if any(p in name for p in _LORA_PARTS):
            out[name] = name.replace(".default", "")
        elif ".modules_to_save.default." in name:
            out[name] = name.replace(".modules_to_save.default.", ".")
    return out


def adapter_config(cfg: RunConfig, names: dict[str, str]):
    from peft import LoraConfig

    lora = cfg.model.lora
    module_of = lambda key, part: key.removeprefix(PEFT_PREFIX).split(part)[0].rsplit(".", 1)[-1]  # noqa: E731
    targets = sorted({module_of(k, ".lora_") for k in names if ".lora_" in k})
    saved = sorted({module_of(k, ".modules_to_save.") for k in names if ".modules_to_save." in k})
    task = "CAUSAL_LM" if cfg.model.task == "causal_lm" else "SEQ_CLS"
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=targets or lora.target_modules, modules_to_save=saved or None,
                      task_type=task, base_model_name_or_path=cfg.model.name_or_path)


def write_adapter(folder: Path, reader: CheckpointReader, cfg: RunConfig) -> WriteResult:
    names = adapter_names(reader)
    writer = ShardedSafetensorsWriter(folder, shard_bytes=1 << 62, single_file=ADAPTER_FILE)
    for name, tensor in reader.items(only=set(names)):
        writer.add(names[name], tensor)
    result = writer.close()
    adapter_config(cfg, names).save_pretrained(str(folder))
    load_tokenizer(cfg.model.name_or_path).save_pretrained(str(folder))
    return result


# --- loading and verification ----------------------------------------------------------------


def is_adapter_dir(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def load_consolidated(cfg: RunConfig, folder: str | Path) -> torch.nn.Module:
    """The consolidated model as evaluate uses it: a plain HF model, or the base + peft adapter."""
    # In the dtype training loaded the base in (a bf16 base under LoRA): its logits are training's.
    dtype = base_dtype(cfg)
    if not is_adapter_dir(folder):
        return load_model(cfg.model, cfg.data.labels, path=folder, dtype=dtype)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(cfg.model, cfg.data.labels, dtype=dtype), str(folder))


def verify(folder: Path, reader: CheckpointReader, cfg: RunConfig, verify_file: Path,
           adapter: bool) -> dict[str, Any]:
    """Weights always (a few rows of logits cannot see, e.g., embedding rows of unused tokens);
    logits too when training left verify.pt (they also prove config, tying and head)."""
    model = load_consolidated(cfg, folder).eval()
    if adapter:
        expected = reader.items(only=set(adapter_names(reader)))
    else:
        expected = model_tensors(reader, cfg, model.config)
    report = {"verify": "weights", "verify_max_abs_weight_diff": compare_weights(model, expected)}
    if verify_file.is_file():
        # A bf16 base with the adapters merged in rounds W + BA to bf16, where training added the
        # adapters' output instead: logits then agree to bf16's resolution (the weights still exactly).
        rounded = not adapter and is_peft(reader) and base_dtype(cfg) == torch.bfloat16
        rtol = BF16_MERGED_RTOL if rounded else 0.0
        diff = compare_logits(model, verify_file, cfg, rtol)
        report.update(verify="logits+weights", verify_max_abs_diff=diff)
    return report


@torch.no_grad()
def compare_logits(model: torch.nn.Module, verify_file: Path, cfg: RunConfig, rtol: float = 0.0) -> float:
    saved = torch.load(verify_file, map_location="cpu", weights_only=True)
    # verify.pt holds the logits as training computed them, so compute them the same way.
    bf16 = saved.get("precision", cfg.train.precision) == "bf16"  # what training ran in (precision.py)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).logits
    expected = saved["logits"].float()
    diff = float((logits.float() - expected).abs().max())
    return _checked(diff, "logit", VERIFY_ATOL + rtol * float(expected.abs().max()))


def compare_weights(model: torch.nn.Module, expected: Tensors) -> float:
    """Every checkpoint tensor against the reloaded model's, one at a time."""
    loaded = model.state_dict()
    worst = 0.0
    for name, tensor in expected:
        if name not in loaded or loaded[name].shape != tensor.shape:
            raise RuntimeError(f"consolidated model differs from the checkpoint: {name!r} missing or "
                               "reshaped")
        if tensor.numel():
            diff = (loaded[name].detach().double() - tensor.detach().double()).abs().max()
            worst = max(worst, float(diff))
    return _checked(worst, "weight")


def _checked(diff: float, what: str, atol: float = VERIFY_ATOL) -> float:
    if not diff <= atol:
        raise RuntimeError(f"consolidated model differs from the checkpoint: max |{what} diff| {diff:.3g}")
    return diff
