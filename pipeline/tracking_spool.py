"""What tracking could not send: spooled to RUN_DIR/tracking/spool/, sent later by `ftpipe sync`.

Each process appends JSON lines (pipeline/tracking_ops.py records) to a file of its own; the spool
of a run directory is bounded (SPOOL_LIMIT_BYTES, checked by each writer against the folder's size):
past it, further records are dropped with one warning. `ftpipe sync` sends every file in the order
the files were started, then renames it `*.synced`; sending the same file again changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.secrets import redact
from pipeline.tracking_ops import Session, Unresolved, is_transient

SPOOL_LIMIT_BYTES = 32 * 1024 * 1024
RECHECK_BYTES = 1024 * 1024  # how often a writer looks at what the other writers added
SYNC_RETRY_DELAYS_S = (1.0, 2.0, 4.0)
log = logging.getLogger("ftpipe.tracking")


def spool_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.jsonl")) if folder.is_dir() else 0


class Spool:
    """Appends records to this process's spool file, created on the first record."""

    def __init__(self, folder: Path, limit: int = SPOOL_LIMIT_BYTES):
        self.folder, self.limit = folder, limit
        self.path: Path | None = None
        self.lock = threading.Lock()
        self.used = self.unchecked = 0
        self.records = self.dropped = 0

    def add(self, op: dict[str, Any]) -> None:
        line = (json.dumps(op, separators=(",", ":")) + "\n").encode("utf-8")
        with self.lock:
            if self.path is None:
                self._open()
            if self.unchecked >= RECHECK_BYTES:
                self.used, self.unchecked = spool_size(self.folder), 0
            if self.used + len(line) > self.limit:
                self._drop()
                return
            with open(self.path, "ab") as handle:
                handle.write(line)
            self.used += len(line)
            self.unchecked += len(line)
            self.records += 1

    def _open(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.folder / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.used = spool_size(self.folder)

    def _drop(self) -> None:
        if not self.dropped:
            size = f"{self.limit // 2**20} MiB" if self.limit >= 2**20 else f"{self.limit} bytes"
            log.warning("tracking spool %s is full (%s): further tracking data of this run is dropped",
                        self.folder, size)
        self.dropped += 1


def spool_files(folder: Path) -> list[Path]:
    """Spool files not sent yet, oldest first."""
    found = folder.glob("*.jsonl") if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[0]))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's records; a line torn by a kill mid-write is skipped with a warning."""
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s:%d: not a whole record (cut short when the writer was stopped?); skipped",
                        path, number)
    return records


def replay(folder: Path, uri: str) -> tuple[int, int]:
    """Send every spool file in `folder` to `uri`; (records sent, records MLflow refused).

    Raises ConnectionError (the server did not answer) with nothing lost: the files stay."""
    session = Session(uri, replaying=True)
    files = spool_files(folder)
    per_file = [read_records(path) for path in files]
    # A run created by an earlier, interrupted sync is found by its key tag: its record is needed.
    for path in sorted(folder.glob("*.jsonl.synced")):
        per_file.append(read_records(path))
    for records in per_file:
        session.creations.update((op["key"], op) for op in records if op["op"] == "create_run")
    sent = refused = 0
    for path, records in zip(files, per_file[:len(files)], strict=True):
        for op in records:
            if _send(session, op, uri):
                sent += 1
            else:
                refused += 1
        path.rename(path.with_name(path.name + ".synced"))
    return sent, refused


def _send(session: Session, op: dict[str, Any], uri: str) -> bool:
    for delay in (*SYNC_RETRY_DELAYS_S, None):
        try:
            session.send(op)
            return True
        except Unresolved as missing:
            log.warning("tracking record %s for run key %s, whose creation is not in the spool; skipped",
                        op["op"], missing)
            return False
        except Exception as err:  # noqa: BLE001 - sorted into retry / refused below
            if not is_transient(err):
                log.warning("MLflow refused a %s record: %s", op["op"], first_line(err))
                return False
            if delay is None:
                raise ConnectionError(f"MLflow at {redact(uri)} did not answer: {first_line(err)}") from None
            time.sleep(delay)
    return False


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return redact(lines[0] if lines else type(err).__name__)
