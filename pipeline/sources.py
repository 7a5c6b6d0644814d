"""The input files a run reads: globs expanded in order, each with its source's weight and limit,
and the checks that touch the file system before anything runs."""

from __future__ import annotations

import glob
import re
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


def check_paths(cfg: RunConfig) -> None:
    """Fail early, naming the key, when an input the run needs is missing."""
    source_files(cfg)
    template = cfg.data.chat_template
    if template is not None and not Path(template).is_file():
        raise UserError(f"data.chat_template: no file {template!r}")
    name = cfg.model.name_or_path
    local = Path(name)
    if not local.exists() and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UserError(f"model.name_or_path: {name!r} is neither a local directory nor a hub id")
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"model.name_or_path: {name!r} has no config.json")
