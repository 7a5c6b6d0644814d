"""Run-directory layout, atomic writes and stage manifests.

Everything a stage publishes is written under a temporary name and renamed into place, and the
stage's manifest.json is written last: a folder without a manifest is unfinished work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINGERPRINT_FILE = ".fingerprint"


@dataclass(frozen=True)
class RunDir:
    """Names every file and folder of one run directory; stage folders are `<root>/<stage name>`."""

    root: Path

    @property
    def config_file(self) -> Path:
        """The resolved config every job and rank reads (written once per run or submission)."""
        return self.root / "config.yaml"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def jobs_file(self) -> Path:
        return self.slurm_dir / "jobs.json"

    @property
    def mlflow_parent_file(self) -> Path:
        """The MLflow parent run that a submitted run's jobs attach to."""
        return self.slurm_dir / "mlflow.json"

    @property
    def tracking_dir(self) -> Path:
        """What tracking keeps for later: credentials (owner-only) and the spool `ftpipe sync` sends."""
        return self.root / "tracking"

    @property
    def credentials_file(self) -> Path:
        return self.tracking_dir / "credentials.json"

    @property
    def spool_dir(self) -> Path:
        return self.tracking_dir / "spool"

    @property
    def sweep_file(self) -> Path:
        """A sweep's base run: its members and summary job (`ftpipe submit --sweep`)."""
        return self.root / "sweep.json"

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweep"

    @property
    def model_dir(self) -> Path:
        return self.stage("consolidate") / "model"

    @property
    def metrics_file(self) -> Path:
        return self.stage("evaluate") / "metrics.json"

    def stage(self, name: str) -> Path:
        return self.root / name

    def write_config(self, text: str) -> None:
        # Owner and group only: the config may hold SLURM setup lines that export tokens.
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        atomic_write_text(self.config_file, text, private=True)

    def manifest_path(self, name: str) -> Path:
        return self.stage(name) / "manifest.json"

    def read_manifest(self, name: str) -> dict[str, Any] | None:
        path = self.manifest_path(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path(name), manifest)

    def claim_stage(self, name: str, fingerprint: str, keep_units: bool = False) -> bool:
        """Prepare the stage folder for `fingerprint`; True when earlier partial work is reusable.

        Partial work (shard markers, checkpoints) from the same fingerprint is kept so the stage
        resumes; anything from another fingerprint, or a finished manifest being redone, goes.
        With `keep_units` only the manifest goes: the stage checks each shard's own fingerprint.
        """
        folder = self.stage(name)
        marker = folder / FINGERPRINT_FILE
        previous = marker.read_text().strip() if marker.is_file() else None
        reusable = previous == fingerprint and not self.manifest_path(name).exists()
        if keep_units:
            self.manifest_path(name).unlink(missing_ok=True)
        elif folder.exists() and not reusable:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, fingerprint + "\n")
        return reusable and previous is not None


def atomic_write_bytes(path: Path, data: bytes, private: bool = False) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the whole new one.
    `private`: mode 0600 from the start (the file holds or may hold credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    opener = (lambda name, flags: os.open(name, flags, 0o600)) if private else None
    with open(tmp, "wb", opener=opener) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, private: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), private)


def atomic_write_json(path: Path, obj: Any, private: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", private)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds."""
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_stale_tmp(folder: Path) -> None:
    """Delete temporaries a killed process left behind."""
    if folder.is_dir():
        for child in folder.glob(".*.tmp-*"):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
