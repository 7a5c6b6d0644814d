"""Read model tensors out of a training checkpoint folder, one tensor at a time.

No process group and no GPU: every format is read from its files on the CPU. Each reader yields
(name, tensor) pairs whose names are the plain model's state_dict keys (wrapper prefixes removed),
so that at most one tensor (plus the writer's current work) is materialised at once.

Formats (meta.json "format", else guessed from the files):
  torch      model.pt = torch.save(state_dict) (single process, DDP)
  dcp        dcp/ = torch.distributed.checkpoint of {"model": ..., "optimizer": ...} (FSDP2)
  deepspeed  deepspeed/ = DeepSpeedEngine.save_checkpoint(tag="deepspeed"), ZeRO-1/2/3
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.run_dir import listed_damage
from pipeline.unpickling import allowlist_pickle, refuse_untrusted

COMPLETE = "COMPLETE"  # pipeline.train.checkpoint's marker: the files it lists are checked before use
DCP_BATCH_BYTES = 64 << 20  # tensors loaded per dcp.load call: fewer calls, bounded memory
_WRAPPERS = re.compile(r"(?:_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def clean_name(name: str) -> str:
    """The plain model's key for a wrapped module's key (DDP/DeepSpeed, compile, checkpointing)."""
    name = _WRAPPERS.sub("", name)
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def checkpoint_format(folder: Path) -> str:
    meta = folder / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text())["format"]
    for fmt, marker in (("deepspeed", "deepspeed"), ("dcp", "dcp"), ("torch", "model.pt")):
        if (folder / marker).exists():
            return fmt
    raise FileNotFoundError(f"{folder}: no meta.json and no known checkpoint files")


class CheckpointReader:
    """Base: subclasses fill `self._sources` (name -> loader) in their stored order."""

    format = "?"

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], torch.Tensor]] = {}

    def keys(self) -> list[str]:
        return list(self._sources)

    def read(self, name: str) -> torch.Tensor:
        return self._sources[name]()

    def items(self, only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in stored order; `only` restricts to those names."""
        for name, load in self._sources.items():
            if only is None or name in only:
                yield name, load()

    def _add(self, raw_name: str, load: Callable[[], torch.Tensor]) -> None:
        self._sources[clean_name(raw_name)] = load


def open_checkpoint(folder: str | Path) -> CheckpointReader:
    folder = Path(folder)
    marker = folder / COMPLETE
    if marker.is_file() and (damage := listed_damage(marker)):
        raise UserError(f"{damage}: the checkpoint changed since it was written")
    readers = {"torch": TorchReader, "dcp": DCPReader, "deepspeed": DeepSpeedReader}
    fmt = checkpoint_format(folder)
    if fmt not in readers:
        raise ValueError(f"{folder}: unknown checkpoint format {fmt!r}")
    return readers[fmt](folder)


# --- torch.save state dicts ------------------------------------------------------------------


class TorchReader(CheckpointReader):
    format = "torch"

    def __init__(self, folder: Path):
        super().__init__()
        state = torch.load(folder / "model.pt", map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in state.items():
            self._add(name, lambda t=tensor: t)


# --- torch.distributed.checkpoint (FSDP2) ----------------------------------------------------


class DCPReader(CheckpointReader):
    """Tensors under "model." in a DCP folder, loaded a batch at a time without a process group."""

    format = "dcp"
    PREFIX = "model."

    def __init__(self, folder: Path):
        super().__init__()
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = folder / "dcp" if (folder / "dcp").is_dir() else folder
        refuse_untrusted(self.path)  # DCP reads its .metadata with plain pickle.load
        meta = FileSystemReader(str(self.path)).read_metadata().state_dict_metadata
        self.entries = {k: m for k, m in meta.items()
                        if k.startswith(self.PREFIX) and isinstance(m, TensorStorageMetadata)}
        for key in self.entries:
            self._add(key[len(self.PREFIX):], lambda k=key: self._load([k])[k])

    def items(self, only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for batch in self._batches(only):
            loaded = self._load(batch)
            for key in batch:
                yield clean_name(key[len(self.PREFIX):]), loaded.pop(key)

    def _batches(self, only: set[str] | None) -> Iterator[list[str]]:
        batch, size = [], 0
        for key, meta in self.entries.items():
            if only is not None and clean_name(key[len(self.PREFIX):]) not in only:
                continue
            batch.append(key)
            size += math.prod(meta.size) * meta.properties.dtype.itemsize
            if size >= DCP_BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        meta = self.entries
        out = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
        with warnings.catch_warnings():  # "no process group, loading in one process": intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=dcp.FileSystemReader(str(self.path)), no_dist=True)
        return out


# --- DeepSpeed ZeRO 1/2/3 --------------------------------------------------------------------


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


def _ranked(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern), key=_rank_of)


def _mmap_load(path: Path) -> Any:
    try:
        # weights_only=False only to let our pickle module through: its allowlist is the check.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False,
                          pickle_module=allowlist_pickle)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: {err}") from None


_LIBC = ctypes.CDLL(None, use_errno=True)
_MADV_DONTNEED, _MADV_POPULATE_READ = 4, 22


def _madvise(tensor: torch.Tensor, advice: int, whole_pages_only: bool) -> None:
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // page) * page if whole_pages_only else start // page * page
    last = end // page * page if whole_pages_only else -(-end // page) * page
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)  # failure is harmless


def _gather(pieces: list[torch.Tensor], numel: int, shape: torch.Size) -> torch.Tensor:
    # Map each piece's pages in one call rather than one page fault at a time (meant to save the
    # faults; older kernels ignore the advice; docs/benchmarks.md has what it measured). Afterwards
    # drop them from this process's resident set: the file is mapped privately and never written,
    # so touching them again just re-reads the page cache, and without this every fp32 partition
    # read would stay resident to the end.
    for piece in pieces:
        _madvise(piece, _MADV_POPULATE_READ, whole_pages_only=False)
    full = torch.cat(pieces)[:numel].reshape(shape)  # cat copies: the mapped pages can go
    for piece in pieces:
        _madvise(piece, _MADV_DONTNEED, whole_pages_only=True)
    return full


def _pieces(chunks: list[torch.Tensor], begin: int, end: int) -> list[torch.Tensor]:
    """The parts of chunks (1-d tensors seen end to end) that fall in [begin, end)."""
    out, start = [], 0
    for chunk in chunks:
        stop = start + chunk.numel()
        if stop > begin and start < end:
            out.append(chunk[max(begin, start) - start: min(end, stop) - start])
        start = stop
    return out


class DeepSpeedReader(CheckpointReader):
    """Full fp32 weights rebuilt from the ranks' fp32 optimizer partitions, one parameter at a time.

    The optimizer files are memory-mapped, so only the fp32 master partitions are ever paged in
    (never the Adam moments beside them), and each parameter's pages are released once copied.
    Why not DeepSpeed's get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True): it needs DeepSpeed
    installed and imported, is lazy only for ZeRO-3 trainable parameters (ZeRO-1/2 concatenate the
    whole fp32 model first, frozen ZeRO-3 parameters are gathered up front) and leaves the pages it
    read resident: its peak memory was far higher for every stage (docs/benchmarks.md).
    """

    format = "deepspeed"

    def __init__(self, folder: Path):
        super().__init__()
        self.path = folder / "deepspeed" if (folder / "deepspeed").is_dir() else folder
        optim = [_mmap_load(p)["optimizer_state_dict"] for p in _ranked(self.path, "*_optim_states.pt")]
        self.stage = optim[0]["zero_stage"]
        count = optim[0]["partition_count"]
        self.world_size = max(count) if isinstance(count, list) else count
        if len(optim) != self.world_size:
            raise ValueError(f"{self.path}: {len(optim)} optimizer files for {self.world_size} ranks")
        models = [_mmap_load(p) for p in _ranked(self.path, "*model_states.pt")]
        self._add_buffers(models[0])
        if self.stage <= 2:
            self._add_frozen_replicated(models[0])
            self._add_zero12(models[0]["param_shapes"], optim)
            self._add_unlisted(models[0])
        else:
            self._add_frozen_partitioned(models)
            self._add_zero3(models[0]["param_shapes"], [o["fp32_flat_groups"] for o in optim])
        self._add_shared(models[0].get("shared_params", {}))

    def _add_buffers(self, model: dict) -> None:
        module = model.get("module") or {}
        for name in model.get("buffer_names", []):
            tensor = module[name]
            self._add(name, lambda t=tensor: t.float() if t.is_floating_point() else t)

    def _add_frozen_replicated(self, model: dict) -> None:
        fragments = model.get("frozen_param_fragments") or {}
        for name in model.get("frozen_param_shapes") or {}:
            self._add(name, lambda t=fragments[name]: t.float())

    def _add_unlisted(self, model: dict) -> None:
        # ZeRO-1 leaves frozen parameters out of frozen_param_shapes; stage 1/2 checkpoints still
        # hold the full module, so anything not rebuilt from the partitions comes from there.
        for name, tensor in (model.get("module") or {}).items():
            if clean_name(name) not in self._sources:
                self._add(name, lambda t=tensor: t.float() if t.is_floating_point() else t)

    def _add_frozen_partitioned(self, models: list[dict]) -> None:
        for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
            pieces = [m["frozen_param_fragments"][name] for m in models]
            self._add(name, lambda p=pieces, s=shape: _gather(p, math.prod(s), torch.Size(s)).float())

    def _add_zero12(self, param_shapes: list[dict], optim: list[dict]) -> None:
        # Stage 1/2: each group is one flat fp32 vector cut into equal rank partitions, its
        # parameters laid end to end (optionally padded to an alignment after each).
        paddings = optim[0].get("param_alignment_paddings")
        for g, shapes in enumerate(param_shapes):
            chunks = [o["single_partition_of_fp32_groups"][g] for o in optim]
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self._add(name, lambda c=chunks, a=offset, n=numel, s=shape:
                          _gather(_pieces(c, a, a + n), n, torch.Size(s)))
                offset += numel + (paddings[g][i] if paddings is not None else 0)

    def _add_zero3(self, param_shapes: list[dict], flats: list[list[torch.Tensor]]) -> None:
        # Stage 3: every parameter is cut into world_size equal slices (the last one padded);
        # rank r's flat groups hold its slice of each parameter, in param_shapes order.
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                part = -(-numel // self.world_size)
                self._add(name, lambda a=offset, p=part, n=numel, s=shape: _gather(
                    [x for rank in flats for x in _pieces(rank, a, a + p)], n, torch.Size(s)))
                offset += part
        available = sum(t.numel() for t in flats[0])
        if offset != available:
            raise ValueError(f"{self.path}: parameters need {offset} elements per rank, found {available}")

    def _add_shared(self, shared: dict[str, str]) -> None:
        # Tied weights are stored once; the alias re-reads its source when asked.
        for alias, source in shared.items():
            if clean_name(source) in self._sources:
                self._add(alias, self._sources[clean_name(source)])
