"""Write a Hugging Face model directory from a stream of (name, tensor).

Tensors are written to disk as they arrive, never collected: each one's bytes go straight into
the current shard's data file, and a shard is finished (safetensors header, then the data copied
in by the kernel) as soon as the next tensor would push it past SHARD_BYTES. One shard becomes
model.safetensors; more become model-0000i-of-0000N.safetensors with model.safetensors.index.json.
Memory therefore stays at about one tensor whatever the model size.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SHARD_BYTES = 2 << 30  # per safetensors file; tests lower it to exercise the index
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
           torch.float8_e5m2: "F8_E5M2"}


@dataclass
class _Shard:
    data_path: Path
    handle: Any
    entries: dict[str, dict] = field(default_factory=dict)
    size: int = 0


@dataclass
class WriteResult:
    files: list[str]
    tensors: int
    parameters: int  # elements written
    bytes: int


class ShardedSafetensorsWriter:
    """add(name, tensor) in any order; close() names the shards and writes the index."""

    def __init__(self, folder: str | Path, shard_bytes: int | None = None, metadata: dict | None = None,
                 single_file: str = SINGLE_FILE):
        self.folder = Path(folder)
        self.single_file = single_file
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes or SHARD_BYTES
        self.metadata = {"format": "pt", **(metadata or {})}
        self.done: list[tuple[Path, list[str]]] = []  # finished shard files, temporary names
        self.shard: _Shard | None = None
        self.result = WriteResult([], 0, 0, 0)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = _raw_bytes(tensor)
        if self.shard is not None and self.shard.entries and self.shard.size + data.nbytes > self.shard_bytes:
            self._finish_shard()
        if self.shard is None:
            self._open_shard()
        shard = self.shard
        shard.handle.write(data)
        shard.entries[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [shard.size, shard.size + data.nbytes]}
        shard.size += data.nbytes
        self.result.tensors += 1
        self.result.parameters += tensor.numel()
        self.result.bytes += data.nbytes

    def close(self) -> WriteResult:
        if self.shard is not None:
            self._finish_shard()
        if not self.done:
            raise ValueError("no tensors to write")
        if len(self.done) == 1:
            os.replace(self.done[0][0], self.folder / self.single_file)
            self.result.files = [self.single_file]
        else:
            self._name_shards_and_index()
        return self.result

    def _open_shard(self) -> None:
        path = self.folder / f".shard-{len(self.done):05d}.data"
        self.shard = _Shard(path, open(path, "wb"))

    def _finish_shard(self) -> None:
        shard, self.shard = self.shard, None
        shard.handle.close()
        header = json.dumps({"__metadata__": self.metadata, **shard.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data must start 8-byte aligned
        final = shard.data_path.with_suffix(".safetensors")
        with open(final, "wb") as out, open(shard.data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little") + header)
            _copy(data, out)
        shard.data_path.unlink()
        self.done.append((final, list(shard.entries)))

    def _name_shards_and_index(self) -> None:
        weight_map: dict[str, str] = {}
        for number, (path, names) in enumerate(self.done, start=1):
            name = f"model-{number:05d}-of-{len(self.done):05d}.safetensors"
            os.replace(path, self.folder / name)
            weight_map.update(dict.fromkeys(names, name))
            self.result.files.append(name)
        index = {"metadata": {"total_size": self.result.bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        self.result.files.append(INDEX_FILE)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already contiguous (little-endian host)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _copy(src, dst) -> None:
    # Kernel-side copy: the shard's data never passes through this process's memory.
    dst.flush()
    copied = 0
    try:
        while count := os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
            copied += count
    except OSError:
        if copied:
            raise
        shutil.copyfileobj(src, dst, 16 << 20)  # e.g. a filesystem without copy_file_range


def write_weights(folder: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  shard_bytes: int | None = None) -> WriteResult:
    writer = ShardedSafetensorsWriter(folder, shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    return writer.close()


def write_model_dir(folder: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], config: Any,
                    tokenizer: Any = None, generation_config: Any = None,
                    shard_bytes: int | None = None) -> WriteResult:
    """Weights, config.json (the tensors' dtype recorded), tokenizer and generation config."""
    result = write_weights(folder, tensors, shard_bytes)
    config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))
    return result
