"""Atomic checkpoints: written by every rank under a partial name, renamed, marked complete last.

Only folders named step-NNNNNN that hold the COMPLETE marker count; the latest one is found by
scanning, never from a pointer file (such as DeepSpeed's `latest`) that a crash could leave
ahead of the data. Rank 0 renames and marks only after a barrier proves every rank finished and
flushed its files to disk; COMPLETE lists every file's size and checksum (run_dir.file_record), and a
checkpoint whose files no longer match is set aside as step-N.corrupt rather than loaded.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.distributed import DistEnv
from pipeline.errors import UserError
from pipeline.run_dir import (
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    listed_damage,
    room_for,
    tree_bytes,
    vouch_for,
)
from pipeline.train.engine import TrainEngine
from pipeline.unpickling import make_private, refusal

log = logging.getLogger("ftpipe.train")

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def complete_step(root: Path, step: int, key: str) -> Path:
    """The complete checkpoint of `step` under `root`; a UserError naming `key` and the complete steps."""
    found = complete_checkpoints(root)
    wanted = step_dir(root, step)
    if wanted in found:
        return wanted
    steps = ", ".join(str(int(STEP_DIR.match(p.name).group(1))) for p in found) or "none"
    state = "is not complete" if wanted.exists() else "does not exist"
    raise UserError(f"{key}: {wanted} {state}; complete checkpoints in {root}: steps {steps}")


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def damage(folder: Path) -> str | None:
    """Why a complete checkpoint's files differ from what its COMPLETE lists, or None."""
    return listed_damage(folder / MARKER)


def usable_checkpoint(root: Path, dist: DistEnv = DistEnv()) -> Path | None:
    """The latest complete checkpoint whose files match its COMPLETE; newer ones that do not are set
    aside. Every rank looks, and all agree when any one finds damage."""
    while (latest := latest_checkpoint(root)) is not None:
        why = damage(latest)
        if not distributed.all_reduce_max(int(why is not None)):
            return latest
        if dist.is_main:
            set_aside(latest, why or "another rank found its files damaged")
        distributed.barrier()
    return None


def set_aside(folder: Path, why: str) -> Path:
    """Rename a checkpoint that cannot be used to step-N.corrupt (kept for inspection, never deleted)
    and say so."""
    target = folder.with_name(f"{folder.name}.corrupt")
    if target.exists():
        target = folder.with_name(f"{folder.name}.corrupt-{uuid.uuid4().hex[:8]}")
    folder.rename(target)
    fsync_dir(folder.parent)
    log.warning("%s set aside as %s: %s", folder, target.name, why)
    return target


def save_checkpoint(root: Path, step: int, engine: TrainEngine, state: dict[str, Any],
                    dist: DistEnv = DistEnv()) -> Path:
    """Every rank writes its part of `step`; rank 0 publishes the folder once all have. A full disk
    is a one-line error, with the partial folder gone and earlier checkpoints untouched."""
    # Rank 0 names the folder for all ranks: a name of its own, never another writer's partial save.
    token = distributed.broadcast_object(uuid.uuid4().hex[:8])
    partial = root / f".step-{step:06d}.partial-{token}"
    if dist.is_main:
        partial.mkdir(parents=True)
    distributed.barrier()
    try:
        with room_for(partial, lambda: checkpoint_bytes(root, engine)):
            return _write(partial, root, step, engine, state, dist)
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _write(partial: Path, root: Path, step: int, engine: TrainEngine, state: dict[str, Any],
           dist: DistEnv) -> Path:
    engine.save(partial)
    torch.save(capture_rng(), partial / f"rng-rank{dist.rank}.pt")
    distributed.barrier()
    if dist.local_rank == 0:  # one rank per node flushes what the node wrote (files of any rank)
        fsync_tree(partial)
    distributed.barrier()
    if dist.is_main:
        atomic_write_json(partial / "meta.json", engine.describe())
        atomic_write_json(partial / "trainer_state.json", state)
        make_private(partial)
        files = sorted(p for p in partial.rglob("*") if p.is_file())
        record = {"step": step, "files": vouch_for(files, partial)}
        shutil.rmtree(step_dir(root, step), ignore_errors=True)
        partial.rename(step_dir(root, step))
        fsync_dir(root)
        atomic_write_json(step_dir(root, step) / MARKER, record)
    distributed.barrier()
    return step_dir(root, step)


def checkpoint_bytes(root: Path, engine: TrainEngine) -> int:
    """About what a checkpoint takes: the last one's size, else fp32 weights and AdamW's two moments."""
    latest = latest_checkpoint(root)
    if latest is not None:
        return tree_bytes(latest)
    params = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in engine.unwrapped.parameters()]
    return sum(numel * (12 if trainable else 4) for numel, trainable in params)


def load_checkpoint(folder: Path, engine: TrainEngine, dist: DistEnv = DistEnv()) -> dict[str, Any]:
    """Load engine state on every rank; RNG only where this rank saved one (same world size)."""
    engine.load(folder)
    rng_file = folder / f"rng-rank{dist.rank}.pt"
    if rng_file.is_file():
        restore_rng(_load_rng(rng_file))
    return json.loads((folder / "trainer_state.json").read_text())


def prune(root: Path, keep_last: int, keep_steps: set[int] | None = None) -> None:
    """Drop old complete checkpoints beyond keep_last (but not those of keep_steps: the best one),
    and partial ones a crash left behind."""
    kept = {step_dir(root, step) for step in keep_steps or ()}
    for folder in complete_checkpoints(root)[:-keep_last]:
        if folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)
    for folder in root.glob(".step-*.partial*"):
        shutil.rmtree(folder, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    """Every generator's state as tensors, ints and lists: loadable with weights_only=True."""
    numpy = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                      "pos": numpy["state"]["pos"], "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        key = numpy["key"].numpy().astype(np.uint32)
        np.random.set_state({"bit_generator": "MT19937", "state": {"key": key, "pos": numpy["pos"]},
                             "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    else:  # written by ftpipe before 2026-11: numpy's legacy tuple
        np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_rng(path: Path) -> dict[str, Any]:
    # Older files hold numpy's state as an array: let just its reconstruction through (the last item
    # is the function numpy arrays pickle through, whichever module this numpy keeps it in).
    legacy = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(1).__reduce__()[0]]
    try:
        with torch.serialization.safe_globals(legacy):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: not a random-state file ftpipe wrote, refused ({refusal(err)})") from None
