"""Run-directory layout, atomic writes, manifests and fingerprints.

Everything a stage publishes is written under a temporary name and renamed into place, and the
stage's manifest.json is written last: a folder without a manifest is unfinished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES: tuple[str, ...] = ("shard", "tokenize", "train", "consolidate", "evaluate")
FINGERPRINT_FILE = ".fingerprint"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def stage(self, name: str) -> Path:
        assert name in STAGES, name
        return self.root / name

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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


def fingerprint(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path, cache: dict[str, Any] | None = None) -> str:
    """Content hash of a file; `cache` (keyed by path, size, mtime) avoids re-reading big inputs."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache is not None:
        cache[key] = value
    return value


class DigestCache:
    """A small JSON file of content digests shared by all runs under one output_dir."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, str] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.entries = {}

    def digest(self, path: Path) -> str:
        return file_digest(path, self.entries)

    def save(self) -> None:
        if not self.path.parent.is_dir():
            return  # planning alone (validate, --dry-run) must not create the output folder
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, self.entries)
