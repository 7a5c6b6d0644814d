"""The completion base of unit-wise stages (shard, tokenize): work split into units, one marker each.

A unit's completion marker holds its fingerprint and each output's size and checksum, and is
written last, atomically, after its outputs reached the disk: a marker with the fingerprint the unit
has now, over outputs that still match it, means done, so a killed or changed run (or
a resubmitted SLURM array) redoes only the units without one. The local worker pool and SLURM array
tasks both run `run_task`. Every path comes from the stage's units, so this module imports no stage.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.parallel import Task, run_tasks
from pipeline.run_dir import (
    RunDir,
    atomic_file,
    atomic_write_json,
    damaged_file,
    remove_stale_tmp,
    vouch_for,
)


class Unit(Protocol):
    """One unit of work and of caching."""

    @property
    def index(self) -> int:
        """NNNNN: every output of the unit in `folder` is named by it (NNNNN.arrow, NNNNN/...)."""

    @property
    def folder(self) -> Path:
        """Where the unit's outputs are, beside those of the stage's other units with that folder."""

    @property
    def fingerprint(self) -> str:
        """What the unit's outputs depend on: its input, the settings it reads, the code."""

    @property
    def marker(self) -> Path:
        """Its completion marker (a JSON object with the fingerprint), written after every output."""

    @property
    def rejects(self) -> Path:
        """The rows it rejected, one JSON object a line (it may be empty, never missing once done)."""

    @property
    def outputs(self) -> list[Path]:
        """Every file its work wrote (the rejects file too): its marker records their sizes and
        checksums, and the unit is done only while they match."""


@runtime_checkable
class UnitStage(Protocol):
    """A stage whose work is units; rank r of a task is units(...)[r]. Implementations are
    module-level objects that pickle by reference: worker processes start by spawn."""

    name: str

    def task_count(self, cfg: RunConfig, run_dir: RunDir) -> int:
        """How many units, known before the stages upstream ran (SLURM sizes its arrays by it)."""

    def ready(self, cfg: RunConfig, run_dir: RunDir) -> bool:
        """Whether units() can be listed: the upstream output they are made from is there."""

    def units(self, cfg: RunConfig, run_dir: RunDir) -> Sequence[Unit]:
        """Every unit with its fingerprint, in rank order."""

    def work(self, cfg: RunConfig, run_dir: RunDir, unit: Any) -> dict[str, Any]:
        """Write the unit's outputs, each by an atomic rename, and its rejects file; return what its
        marker records besides the fingerprint."""


# One unit list per stage in this process: (config, run dir) it was made for, the units.
_LISTED: dict[str, tuple[tuple[str, str], list[Any]]] = {}


def unit_list(stage: UnitStage, cfg: RunConfig, run_dir: RunDir, refresh: bool = False) -> list[Any]:
    """stage.units(), made once per stage run in each process rather than once per task (every unit's
    fingerprint each time: quadratic in thousands of units). A stage's run refreshes it before any
    task starts; a worker process or SLURM array task makes it at its first task."""
    key = (cfg.model_dump_json(), str(run_dir.root))
    listed = _LISTED.get(stage.name)
    if refresh or listed is None or listed[0] != key:
        listed = _LISTED[stage.name] = (key, list(stage.units(cfg, run_dir)))
    return listed[1]


def current(unit: Unit) -> dict[str, Any] | None:
    """The unit's marker when it has the unit's fingerprint and every output it vouches for is
    there as written: the unit is done."""
    record, _ = _checked(unit)
    return record


def problem(unit: Unit) -> str | None:
    """Why the unit is not done, in one line naming the file; None when it is."""
    return _checked(unit)[1]


def _checked(unit: Unit) -> tuple[dict[str, Any] | None, str | None]:
    try:
        record = json.loads(unit.marker.read_text())
    except FileNotFoundError:
        return None, f"{unit.marker} is missing"
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{unit.marker} is unreadable ({err})"
    if not isinstance(record, dict) or record.get("fingerprint") != unit.fingerprint:
        return None, f"{unit.marker} is from other inputs"
    if not isinstance(record.get("outputs"), dict):
        return None, f"{unit.marker} lists no output sizes (written by an older ftpipe)"
    damage = damaged_file(record["outputs"], unit.marker.parent, unit.marker)
    return (None, damage) if damage else (record, None)


def first_problem(stage: UnitStage, cfg: RunConfig, run_dir: RunDir) -> str | None:
    """Why a stage whose manifest says done must still run (a unit's file missing, truncated or
    changed since its marker), or None; the run then redoes only such units."""
    for unit in unit_list(stage, cfg, run_dir, refresh=True):
        found = problem(unit)
        if found:
            return found
    return None


def stale(todo: Sequence[Unit]) -> list[int]:
    """Ranks of the units without a current marker."""
    return [rank for rank, unit in enumerate(todo) if current(unit) is None]


def pending(stage: UnitStage, cfg: RunConfig, run_dir: RunDir) -> list[int]:
    """Ranks without a current marker, what a rerun or a resubmitted job array has to do; all of them
    while the units cannot be listed yet."""
    if not stage.ready(cfg, run_dir):
        return list(range(stage.task_count(cfg, run_dir)))
    return stale(unit_list(stage, cfg, run_dir, refresh=True))


def run_task(stage: UnitStage, cfg: RunConfig, run_dir: RunDir, rank: int, world_size: int) -> dict[str, Any]:
    """Task `rank` of `world_size`: unit number `rank` unless its marker is current, the marker last."""
    todo = unit_list(stage, cfg, run_dir)
    assert len(todo) == world_size, (stage.name, len(todo), world_size)
    unit = todo[rank]
    done = current(unit)
    if done is not None:
        return done
    record = {**stage.work(cfg, run_dir, unit), "fingerprint": unit.fingerprint}
    # The outputs reach the disk before the marker that vouches for them.
    record["outputs"] = vouch_for(unit.outputs, unit.marker.parent)
    atomic_write_json(unit.marker, record)
    return record


def task(stage: UnitStage) -> Task:
    """run_task for `stage` as a pool task: picklable, since the stage object is."""
    return functools.partial(run_task, stage)


def remove_stale(folder: Path, count: int) -> None:
    """Drop temporaries of killed tasks and the outputs of units that no longer exist (fewer sources
    or shards): readers take every numbered file of a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(folder)
    for path in folder.glob("[0-9]*"):
        if int(path.name[:5]) < count:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@dataclass(frozen=True)
class Completed:
    units: list[Any]  # every unit, in rank order
    records: list[dict[str, Any]]  # their markers, in the same order
    ran: int  # how many had no current marker and ran now; the others were reused


def run_units(stage: UnitStage, cfg: RunConfig, run_dir: RunDir, workers: int,
              threads: bool = False) -> Completed:
    """Every unit done: the stale outputs cleaned, the units without a current marker run by
    `workers` workers (threads of this process when `threads`), every marker read back."""
    todo = unit_list(stage, cfg, run_dir, refresh=True)
    for folder in {unit.folder for unit in todo}:
        remove_stale(folder, sum(unit.folder == folder for unit in todo))
    ranks = stale(todo)
    for _ in run_tasks(task(stage), cfg, run_dir, ranks, len(todo), workers, threads):
        pass  # each task wrote its marker; the records are read back from them below
    records = [current(unit) for unit in todo]
    assert all(record is not None for record in records), f"{stage.name}: a unit ended without its marker"
    return Completed(todo, records, len(ranks))


def merge_rejects(todo: Sequence[Unit], target: Path) -> int:
    """One rejects file for the stage: the units' own files (which a resumed run keeps) in unit order.
    Returns how many rows it holds."""
    with atomic_file(target) as merged:
        return sum(_append(unit.rejects, merged) for unit in todo)


def _append(part: Path, merged: BinaryIO) -> int:
    """Copy `part` to the end of `merged` a chunk at a time; return its lines."""
    lines = 0
    with open(part, "rb") as source:
        while chunk := source.read(1 << 20):
            lines += chunk.count(b"\n")
            merged.write(chunk)
    return lines


def check_rejects(cfg: RunConfig, train_rows: int, total: int, rejected: Sequence[int],
                  files: Sequence[Path], empty: str) -> None:
    """data.max_reject_fraction over the rows rejected so far of the `total` rows read, and training
    rows left, before training starts. `rejected` and `files`: this stage's first, then upstream's;
    `empty` says what is missing when no training row is left."""
    if train_rows == 0:
        reasons = commonest_reasons(files[:1])
        raise UserError(f"data.train: {empty} ({rejected[0]} rejected{reasons}, see {files[0]})")
    share = sum(rejected) / max(1, total)
    if share > cfg.data.max_reject_fraction:
        raise UserError(
            f"data: {sum(rejected)} of {total} rows rejected ({share:.1%} > data.max_reject_fraction "
            f"{cfg.data.max_reject_fraction:.1%}){commonest_reasons(files)}; "
            f"see {' and '.join(str(f) for f in files)}")


def reason_kind(reason: str) -> str:
    """A reject reason without what varies from row to row (numbers, the trailing explanation):
    "malformed JSON: Expecting value at column N", "unknown label N", "missing field 'text'"."""
    return re.sub(r"(?<![\w-])[0-9]+(?![\w-])", "N", re.sub(r" \(.*\)$", "", reason))


def commonest_reasons(files: Sequence[Path], top: int = 3) -> str:
    """', most often: REASON (COUNT), ...' over the rejects files (those that can be read), or ''."""
    counts: collections.Counter[str] = collections.Counter()
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as lines:
                counts.update(reason_kind(str(_reason(line))) for line in lines if line.strip())
        except OSError:
            continue
    if not counts:
        return ""
    shown = ", ".join(f"{reason} ({count})" for reason, count in counts.most_common(top))
    others = len(counts) - top
    return f", most often: {shown}" + (f" and {others} more" if others > 0 else "")


def _reason(line: str) -> object:
    try:
        record = json.loads(line)
    except ValueError:
        return "unreadable reject record"
    return record.get("reason") if isinstance(record, dict) else "unreadable reject record"
