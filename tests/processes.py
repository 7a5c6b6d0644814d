"""Runs of the real CLI as separate processes, and the processes torchrun starts under them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO


def start_run(config: Path, *overrides: str, script: str | None = None) -> subprocess.Popen:
    """`ftpipe run CONFIG` in a process of its own; `script` runs first (e.g. to inject a fault)."""
    # Output goes to a file: an unread pipe would fill up and block the ranks.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(config.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    entry = ["-c", f"{script}\nimport sys\nfrom launch.cli import main\nsys.exit(main(sys.argv[1:]))\n"] \
        if script else ["-m", "launch.cli"]
    process = subprocess.Popen([sys.executable, *entry, "run", str(config), "--no-progress", *overrides],
                               env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    process.log_path = Path(log.name)
    return process


def output(process: subprocess.Popen) -> str:
    return process.log_path.read_text()


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, output(process)
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` has `count` lines (e.g. steps in metrics.jsonl)."""
    wait_for_file(path, process, timeout)
    deadline = time.monotonic() + timeout
    while len(path.read_text().splitlines()) < count:
        assert process.poll() is None, output(process)
        assert time.monotonic() < deadline, f"{path} never reached {count} lines"
        time.sleep(0.05)


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Processes below `root` (torchrun starts its workers in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            while pid > 1 and pid != root:
                pid = parent_pid(pid)
        except (OSError, ValueError, IndexError):
            continue
        if pid == root:
            found.append(int(entry.name))
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the run and every rank: torchrun's workers live in their own sessions."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def rank_pid(root: int, rank: int) -> int:
    """The worker process of `rank` started under `root`."""
    for pid in descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"launch.worker" in cmdline and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank}")


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port` whose store lives in `folder` (started again on the
    same folder, it serves the same runs); returns once it accepts connections."""
    log = open(folder / "mlflow-server.log", "a")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = Path(log.name)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, proc.log_path.read_text()
            time.sleep(0.5)
    raise AssertionError(f"mlflow server did not listen on port {port}: {proc.log_path.read_text()}")
