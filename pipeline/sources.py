"""The input files a run reads: globs expanded in order, each with its source's weight and limit,
and the checks that touch the file system before anything runs."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig, SourceSpec
from pipeline.errors import UserError


@dataclass(frozen=True)
class SourceFile:
    """One input file. held_out: None splits its rows by hash, False all train, True all eval."""

    path: Path
    held_out: bool | None
    weight: float = 1.0
    limit: int | None = None


def _spec(entry: str | SourceSpec) -> SourceSpec:
    return entry if isinstance(entry, SourceSpec) else SourceSpec(path=entry)


def expand_sources(entries: list[str | SourceSpec], key: str) -> list[tuple[Path, SourceSpec]]:
    """Resolve globs in order; a pattern that matches nothing is an error naming the key. A file
    that several entries match belongs to the first."""
    files: list[tuple[Path, SourceSpec]] = []
    seen: set[Path] = set()
    for index, entry in enumerate(entries):
        spec = _spec(entry)
        matches = [Path(m) for m in sorted(glob.glob(spec.path, recursive=True)) if Path(m).is_file()]
        if not matches:
            where = f"{key}[{index}]" + (".path" if isinstance(entry, SourceSpec) else "")
            raise UserError(f"{where}: no file matches {spec.path!r}")
        files += [(path, spec) for path in matches if path not in seen]
        seen.update(matches)
    return files


def source_files(cfg: RunConfig) -> list[SourceFile]:
    """Every input file in order: data.train, then data.eval (when given, train is not split)."""
    train = expand_sources(cfg.data.train, "data.train")
    held = expand_sources(cfg.data.eval, "data.eval") if cfg.data.eval else []
    split_rule = None if not held else False
    return ([SourceFile(path, split_rule, spec.weight, spec.limit) for path, spec in train]
            + [SourceFile(path, True) for path, _ in held])


# Containers the shard stage does not open: read as text lines, every line would be rejected.
UNREAD_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".7z", ".arrow", ".feather", ".avro")


def check_paths(cfg: RunConfig) -> None:
    """Fail early, naming the key, when an input file the run reads is missing or cannot be read."""
    for source in source_files(cfg):
        check_source(source)
    template = cfg.data.chat_template
    try:
        found = template is None or Path(template).is_file()
    except OSError as err:  # a name longer than the file system allows
        raise UserError(f"data.chat_template: {err.strerror}: {template[:60]!r}...") from None
    if not found:
        raise UserError(f"data.chat_template: no file {template!r}")


def source_key(source: SourceFile) -> str:
    return "data.eval" if source.held_out else "data.train"


def check_source(source: SourceFile) -> None:
    """A file the shard stage can open: not a compressed or binary container it does not read, and
    a parquet file with a readable footer (a few bytes read, not the data)."""
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
