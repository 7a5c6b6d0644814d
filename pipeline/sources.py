"""The inputs a run reads: files (globs expanded in order) and Hugging Face datasets, each with its
source's weight and limit, and the checks that touch the file system before anything runs."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, RunConfig
from pipeline.config_sources import SourceSpec
from pipeline.digests import DigestCache
from pipeline.errors import UserError
from pipeline.hf_sources import DatasetRef, dataset_digest, is_saved_dataset, load


@dataclass(frozen=True)
class SourceFile:
    """One input: a file, or a dataset split (`dataset`; `path` is then its name or folder).
    held_out: None splits its rows by hash, False all train, True all eval."""

    path: Path
    held_out: bool | None
    weight: float = 1.0
    limit: int | None = None
    dataset: DatasetRef | None = None

    @property
    def name(self) -> str:
        """How rows, rejects and manifests name it."""
        return self.dataset.label if self.dataset else str(self.path)


def _spec(entry: str | SourceSpec) -> SourceSpec:
    return entry if isinstance(entry, SourceSpec) else SourceSpec(path=entry)


def _dataset(spec: SourceSpec, where: str) -> DatasetRef | None:
    """The dataset an entry names: {hf: ...}, or {path: ...} on a save_to_disk folder."""
    if spec.hf is not None:
        files = json.dumps(spec.data_files, sort_keys=True) if spec.data_files is not None else None
        return DatasetRef("hf", spec.hf, spec.split, spec.subset, spec.revision, files, where)
    if is_saved_dataset(Path(spec.path)):
        return DatasetRef("disk", spec.path, spec.split, entry=where)
    return None


Expanded = tuple[Path, SourceSpec, DatasetRef | None]


def expand_sources(entries: list[str | SourceSpec], key: str) -> list[Expanded]:
    """Resolve globs in order; a pattern that matches nothing is an error naming the key. A file
    (or dataset split) that several entries name belongs to the first."""
    found: list[Expanded] = []
    seen: set[Path | DatasetRef] = set()
    for index, entry in enumerate(entries):
        spec, where = _spec(entry), f"{key}[{index}]"
        dataset = _dataset(spec, where)
        if dataset is not None:
            found += [(Path(dataset.name), spec, dataset)] if dataset not in seen else []
            seen.add(dataset)
            continue
        matches = [Path(m) for m in sorted(glob.glob(spec.path, recursive=True)) if Path(m).is_file()]
        if not matches:
            where += ".path" if isinstance(entry, SourceSpec) else ""
            raise UserError(f"{where}: no file matches {spec.path!r}")
        found += [(path, spec, None) for path in matches if path not in seen]
        seen.update(matches)
    return found


def source_files(cfg: RunConfig) -> list[SourceFile]:
    """Every input in order: data.train, then data.eval (when given, train is not split)."""
    train = expand_sources(cfg.data.train, "data.train")
    held = expand_sources(cfg.data.eval, "data.eval") if cfg.data.eval else []
    split_rule = None if not held else False
    return ([SourceFile(path, split_rule, spec.weight, spec.limit, ref) for path, spec, ref in train]
            + [SourceFile(path, True, 1.0, spec.limit, ref) for path, spec, ref in held])


def columns_read(data: DataConfig) -> list[str]:
    """The source fields data.format reads (a dataset source loads only these columns)."""
    names = data.fields
    return {"text": [data.text_field],
            "classification": [data.text_field] + ([data.text_pair_field] if data.text_pair_field else [])
            + [data.label_field],
            "instruction": [names.instruction, names.input, names.output],
            "prompt_completion": [names.prompt, names.completion],
            "chat": [names.messages]}[data.format]


def source_digest(source: SourceFile, data: DataConfig, cache: DigestCache) -> str | dict[str, Any]:
    """What the source's rows depend on: a file's content digest, a dataset's own fingerprint
    (revision included) and the columns read."""
    if source.dataset is None:
        return cache.digest(source.path)
    return dataset_digest(source.dataset, columns_read(data))


# Containers the shard stage does not open: read as text lines, every line would be rejected.
UNREAD_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".7z", ".arrow", ".feather", ".avro")


def check_paths(cfg: RunConfig) -> None:
    """Fail early, naming the key, when an input file the run reads is missing or cannot be read."""
    for source in source_files(cfg):
        check_source(source)


def source_key(source: SourceFile) -> str:
    return "data.eval" if source.held_out else "data.train"


def check_source(source: SourceFile) -> None:
    """A file the shard stage can open: not a compressed or binary container it does not read, and
    a parquet file with a readable footer (a few bytes read, not the data); a dataset that loads."""
    if source.dataset is not None:
        load(source.dataset)
        return
    suffix = source.path.suffix.lower()
    if suffix in UNREAD_SUFFIXES:
        raise UserError(f"{source_key(source)}: {source.path}: {suffix} files are not read; give "
                        "jsonl, parquet, csv, tsv or txt files (decompressed)")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(source.path)
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"{source_key(source)}: {source.path}: not a readable parquet file "
                            f"({str(err).splitlines()[0]})") from None
