"""LoRA checkpoints out of a run: adapters merged into plain weights, or a peft adapter directory.

Merging reproduces what peft computes (merge_and_unload): W + s * B @ A with s = alpha / r, or
alpha / sqrt(r) for rsLoRA; DoRA then rescales each output row to its learned magnitude,
m * (W + s * B @ A) / ||W + s * B @ A|| (row norms). Merged weights come out in fp32 whatever the
base was stored in; the writer casts them to consolidate.dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint_readers import CheckpointReader
from pipeline.config import RunConfig
from pipeline.config_model import LoraConfig
from pipeline.hf_writer import ShardedSafetensorsWriter, WriteResult

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
MAGNITUDE = ".lora_magnitude_vector."
LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", MAGNITUDE)

Tensors = Iterator[tuple[str, torch.Tensor]]


def is_peft(reader: CheckpointReader) -> bool:
    return any(k.startswith(PEFT_PREFIX) and any(p in k for p in LORA_PARTS) for k in reader.keys())


def lora_scale(lora: LoraConfig) -> float:
    return lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)


def merged_lora(reader: CheckpointReader, cfg: RunConfig) -> Tensors:
    """Base weights with their adapters folded in; modules_to_save replace the originals."""
    if cfg.model.lora is None:
        raise RuntimeError("the checkpoint holds LoRA adapters but model.lora is not set")
    scale = lora_scale(cfg.model.lora)
    small = {n for n in reader.keys() if any(p in n for p in LORA_PARTS)}
    adapters = dict(reader.items(only=small))  # a first pass over the small tensors only
    for name, tensor in reader.items():
        if name in small or ".original_module." in name:
            continue
        plain = name.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default.", ".")
        if ".base_layer." in plain:
            module, _, leaf = plain.partition(".base_layer.")
            plain = f"{module}.{leaf}"
            if leaf == "weight":
                tensor = merge_weight(tensor, f"{PEFT_PREFIX}{module}", adapters, scale)
        yield plain, tensor


def merge_weight(weight: torch.Tensor, module: str, adapters: dict[str, torch.Tensor],
                 scale: float) -> torch.Tensor:
    """One base weight with its module's adapter folded in, in fp32 (as peft's merge computes it)."""
    if f"{module}.lora_A.default.weight" in adapters:
        a, b = adapters[f"{module}.lora_A.default.weight"], adapters[f"{module}.lora_B.default.weight"]
        delta = b.float() @ a.float()
    elif f"{module}.lora_embedding_A.default" in adapters:
        a, b = adapters[f"{module}.lora_embedding_A.default"], adapters[f"{module}.lora_embedding_B.default"]
        delta = (b.float() @ a.float()).T
    else:
        return weight
    merged = weight.float() + delta * scale
    magnitude = adapters.get(f"{module}{MAGNITUDE}default.weight")
    if magnitude is None:
        return merged
    if merged.dim() != 2 or f"{module}.lora_A.default.weight" not in adapters:
        raise RuntimeError(f"{module}: DoRA merges only for linear layers here")
    norm = torch.linalg.norm(merged, dim=1)  # peft: ||W + s B A|| of each output row
    return (magnitude.float() / norm).view(-1, 1) * merged


# --- peft adapter directory ------------------------------------------------------------------


def peft_key(name: str) -> str:
    """The key peft saves for a checkpoint key: adapter name dropped; DoRA's magnitude is saved as
    the bare parameter (peft's own naming, which PeftModel.from_pretrained expects)."""
    if MAGNITUDE in name:
        return name.replace(f"{MAGNITUDE}default.weight", MAGNITUDE.rstrip("."))
    return name.replace(".default", "")


def adapter_names(reader: CheckpointReader) -> dict[str, str]:
    """Checkpoint key -> the key peft saves (adapter name dropped, modules_to_save flattened)."""
    out = {}
    for name in reader.keys():
        if any(p in name for p in LORA_PARTS):
            out[name] = peft_key(name)
        elif ".modules_to_save.default." in name:
            out[name] = name.replace(".modules_to_save.default.", ".")
    return out


def adapter_config(cfg: RunConfig, names: dict[str, str]) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    lora = cfg.model.lora
    module_of = lambda key, part: key.removeprefix(PEFT_PREFIX).split(part)[0].rsplit(".", 1)[-1]  # noqa: E731
    targets = sorted({module_of(k, ".lora_") for k in names if ".lora_" in k})
    saved = sorted({module_of(k, ".modules_to_save.") for k in names if ".modules_to_save." in k})
    task = "CAUSAL_LM" if cfg.model.task == "causal_lm" else "SEQ_CLS"
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=targets or lora.target_modules, modules_to_save=saved or None,
                          use_rslora=lora.use_rslora, use_dora=lora.use_dora, task_type=task,
                          base_model_name_or_path=cfg.model.name_or_path)


def write_adapter(folder: Path, reader: CheckpointReader, cfg: RunConfig, tokenizer: Any) -> WriteResult:
    names = adapter_names(reader)
    writer = ShardedSafetensorsWriter(folder, shard_bytes=1 << 62, single_file=ADAPTER_FILE)
    for name, tensor in reader.items(only=set(names)):  # fp32, as peft saves them (exact from bf16)
        writer.add(names[name], tensor.float() if tensor.is_floating_point() else tensor)
    result = writer.close()
    adapter_config(cfg, names).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return result
