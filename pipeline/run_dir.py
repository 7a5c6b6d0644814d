"""Run-directory layout, atomic writes and stage manifests.

Everything a stage publishes is written under a temporary name and renamed into place, and the
stage's manifest.json is written last: a folder without a manifest is unfinished work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import UserError

FINGERPRINT_FILE = ".fingerprint"
# A file record's checksum covers the first and last CHECKED_BYTES of the file (all of a small one):
# two reads per file whatever its size, yet it catches the torn or NUL-filled tail a crash leaves.
CHECKED_BYTES = 1 << 16
FULL_BELOW = 1 << 20  # free bytes under which a failed write is taken for a full disk


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
    def lock_file(self) -> Path:
        """Who writes this run directory now (launch/run_lock.py)."""
        return self.root / ".ftpipe.lock"

    @property
    def model_dir(self) -> Path:
        return self.stage("consolidate") / "model"

    @property
    def metrics_file(self) -> Path:
        return self.stage("evaluate") / "metrics.json"

    def stage(self, name: str) -> Path:
        return self.root / name

    def create(self) -> None:
        # Owner and group only: the config may hold SLURM setup lines that export tokens.
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)

    def write_config(self, text: str) -> None:
        self.create()
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

    def read_claim(self, name: str) -> dict[str, Any] | None:
        """What the stage folder's partial work was started for: {fingerprint, covers, version}."""
        path = self.stage(name) / FINGERPRINT_FILE
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        try:
            claim = json.loads(text)
        except json.JSONDecodeError:
            claim = None
        return claim if isinstance(claim, dict) else {"fingerprint": text}  # a bare fingerprint: older ftpipe

    def claim_stage(self, name: str, claim: dict[str, Any], discard: bool) -> None:
        """Record what the stage folder now holds work for; with `discard`, first delete what it held.

        Only the runner's plan decides `discard`: a forced stage, or one whose earlier output is
        derived from inputs that are being redone. A stage that is not discarded loses only its
        manifest (it is being redone or continued); its partial work stays for the stage to reuse.
        """
        folder = self.stage(name)
        if discard and folder.exists():
            shutil.rmtree(folder)
        self.manifest_path(name).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / FINGERPRINT_FILE, claim)


@contextlib.contextmanager
def atomic_file(path: Path, needed: Callable[[], int | None] = lambda: None,
                private: bool = False) -> Iterator[BinaryIO]:
    """A handle on a temporary sibling of `path`; when the block succeeds it is fsynced, renamed to
    `path` and the folder fsynced: readers see the old file or the whole new one, also after a power
    loss. `needed` estimates the size for a disk-full message; `private`: mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    opener = (lambda name, flags: os.open(name, flags, 0o600)) if private else None
    try:
        with room_for(path, needed), open(tmp, "wb", opener=opener) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data` to `path` through atomic_file. `private`: the file holds or may hold credentials."""
    with atomic_file(path, lambda: len(data), private) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, private: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), private)


def atomic_write_json(path: Path, obj: Any, private: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", private)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.aside")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `final` only if the block succeeds. The old copy is
    renamed aside before the new one comes in and removed after, so that a crash at any point leaves
    one whole copy (recover_aside puts the old one back when the new one never arrived)."""
    recover_aside(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    aside = _aside(final)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside.exists():
        shutil.rmtree(aside)


def recover_aside(final: Path) -> None:
    """Finish what a crash inside atomic_dir left: the old copy goes once the new one is in place,
    and comes back when it is not."""
    aside = _aside(final)
    if not aside.exists():
        return
    if final.exists():
        shutil.rmtree(aside)
    else:
        os.replace(aside, final)
        fsync_dir(final.parent)


@contextlib.contextmanager
def room_for(path: Path, needed: Callable[[], int | None] = lambda: None) -> Iterator[None]:
    """Running out of disk space while the block writes `path` becomes a one-line UserError naming
    it, the space free there and (estimated only then) what the write needs. Libraries report a
    full disk in their own ways (torch.save: a RuntimeError), so any error with the disk then full
    counts."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not _out_of_space(err, path):
            raise
        raise UserError(disk_full_line(path, needed())) from None


def _out_of_space(err: Exception, path: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _free_bytes(path) < FULL_BELOW


def _free_bytes(path: Path) -> int:
    """Free bytes for this user on the filesystem of `path` (or of its nearest existing folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def disk_full_line(path: Path, needed: int | None) -> str:
    need = f", about {_human(needed)} needed" if needed else ""
    return (f"{path}: no space left on device ({_human(_free_bytes(path))} free there{need}); free "
            "some space and run again: finished work is kept")


def _human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def os_error_line(err: OSError) -> str:
    """An OSError in one line: the path, what went wrong, and the free space when the disk is full."""
    if not err.filename:
        return f"{err.strerror or err} (the system did not say on which file)"
    path = Path(os.fsdecode(err.filename))
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_line(path, None)
    return f"{path}: {err.strerror or err}"


def tree_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def fsync_dir(folder: Path) -> None:
    """Make renames and new names in `folder` durable (a file's fsync does not cover its name)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # a filesystem that cannot sync folders (some network ones)
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then every folder, bottom-up: the data before the names."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(parent) / name)
        fsync_dir(Path(parent))


def file_record(path: Path) -> dict[str, int]:
    """What a marker vouches for about a file: its size and the CRC-32 of its ends (see CHECKED_BYTES)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        crc = zlib.crc32(handle.read(CHECKED_BYTES))
        if size > CHECKED_BYTES:
            handle.seek(max(CHECKED_BYTES, size - CHECKED_BYTES))
            crc = zlib.crc32(handle.read(CHECKED_BYTES), crc)
    return {"bytes": size, "crc32": crc}


def vouch_for(paths: list[Path], base: Path) -> dict[str, dict[str, int]]:
    """Flush `paths` (files under `base`) and their folders to disk and record each, by its name
    relative to `base`: what a marker written next holds."""
    for path in paths:
        fsync_file(path)
    for folder in {path.parent for path in paths}:
        fsync_dir(folder)
    return {path.relative_to(base).as_posix(): file_record(path) for path in paths}


def listed_damage(marker: Path) -> str | None:
    """Why a file that `marker` (a JSON object whose "files" came from vouch_for, about files under
    its folder) vouches for is missing or differs; None when all match. A marker of an older ftpipe
    (not JSON) lists no files and vouches for completion only."""
    try:
        text = marker.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return f"{marker} is unreadable ({err})"
    if not text.lstrip().startswith("{"):
        return None
    try:
        files = json.loads(text).get("files", {})
    except (ValueError, AttributeError):
        return f"{marker} is torn"
    return damaged_file(files, marker.parent, marker)


def damaged_file(records: dict[str, dict[str, int]], base: Path, marker: Path) -> str | None:
    """The first file of `records` (from vouch_for) that is missing or differs, said in one line."""
    for name, expected in records.items():
        path = base / name
        try:
            found = file_record(path)
        except FileNotFoundError:
            return f"{path} is missing, but {marker} vouches for it"
        if found["bytes"] != expected["bytes"]:
            return f"{path} has {found['bytes']} bytes, but {marker} vouches for {expected['bytes']}"
        if found["crc32"] != expected["crc32"]:
            return f"{path} does not match the checksum in {marker}"
    return None


def remove_stale_tmp(folder: Path) -> None:
    """Delete temporaries a killed process left behind, and settle copies atomic_dir left aside."""
    if folder.is_dir():
        for aside in folder.glob(".*.aside"):
            recover_aside(aside.with_name(aside.name[1:-len(".aside")]))
        for child in folder.glob(".*.tmp-*"):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
