"""Atomic checkpoints: written by every rank under a partial name, renamed, marked complete last.

Only folders named step-NNNNNN that hold the COMPLETE marker count; the latest one is found by
scanning, never from a pointer file (such as DeepSpeed's `latest`) that a crash could leave
ahead of the data. Rank 0 renames and marks only after a barrier proves every rank finished.
"""

from __future__ import annotations

import json
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
from pipeline.run_dir import atomic_write_json, atomic_write_text
from pipeline.train.engine import TrainEngine

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: Path, step: int, engine: TrainEngine, state: dict[str, Any],
                    dist: DistEnv = DistEnv()) -> Path:
    """Every rank writes its part of `step`; rank 0 publishes the folder once all have."""
    # Rank 0 names the folder for all ranks: a name of its own, never another writer's partial save.
    token = distributed.broadcast_object(uuid.uuid4().hex[:8])
    partial = root / f".step-{step:06d}.partial-{token}"
    final = step_dir(root, step)
    if dist.is_main:
        partial.mkdir(parents=True)
    distributed.barrier()
    engine.save(partial)
    torch.save(capture_rng(), partial / f"rng-rank{dist.rank}.pt")
    distributed.barrier()
    if dist.is_main:
        atomic_write_json(partial / "meta.json", engine.describe())
        atomic_write_json(partial / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        atomic_write_text(final / MARKER, f"step {step}\n")
    distributed.barrier()
    return final


def load_checkpoint(folder: Path, engine: TrainEngine, dist: DistEnv = DistEnv()) -> dict[str, Any]:
    """Load engine state on every rank; RNG only where this rank saved one (same world size)."""
    engine.load(folder)
    rng_file = folder / f"rng-rank{dist.rank}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    return json.loads((folder / "trainer_state.json").read_text())


def prune(root: Path, keep_last: int) -> None:
    """Drop old complete checkpoints beyond keep_last, and partial ones a crash left behind."""
    for folder in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in root.glob(".step-*.partial*"):
        shutil.rmtree(folder, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
