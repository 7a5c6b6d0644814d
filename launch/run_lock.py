"""One writer per run directory: RUN_DIR/.ftpipe.lock says who writes it now.

A holder is one process (`ftpipe run`, `ftpipe submit`, `python -m launch.slurm prepare`; the torchrun
ranks of an `ftpipe run` work under it and take no lock of their own) or one SLURM job: every task
of a stage job (one per node) and every task of a job array (they run at once, each on its own
ranks) is the same holder, named by the job id (an array's SLURM_ARRAY_JOB_ID). Any other writer
stops with exit 2 and one line naming the holder. A lock whose holder is gone is taken over, with a
warning: a process on this host that no longer runs (pid and start time compared, so a reused pid
does not count), a SLURM job that squeue/sacct no longer list as queued or running. What cannot be
checked from here (a process on another host outside SLURM, a job while SLURM does not answer) is
refused, and the line names the file to delete once the holder is known to be gone.

Why a file made by link(2) and not flock/fcntl: the lock must exclude writers on other hosts of a
shared filesystem and must be shared by the tasks of one SLURM job across nodes. An OS lock belongs
to one process and is only as good as the mount: Lustre mounted `localflock` grants node-local
locks that exclude nothing on other nodes (and `noflock` refuses them); NFSv3 needs a working lockd;
fcntl locks vanish when the process closes any descriptor of the file. link(2) of a fully written
unique file onto the lock name is atomic on local filesystems, NFS and Lustre (open(2), O_EXCL: the
portable way to lock over NFS, confirmed by the unique file's link count of 2), so the record
appears whole or not at all and names its holder, which an OS lock cannot.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from launch.slurm_jobs import QUEUED, RUNNING, slurm_states
from pipeline.errors import UserError
from pipeline.run_dir import RunDir

# The job's own processes have ended; SLURM only cleans up (a dependent job may already start).
ENDING = {"COMPLETING", "STAGE_OUT"}
ATTEMPTS = 5
log = logging.getLogger("ftpipe")
_HELD: dict[Path, tuple[str, int]] = {}  # lock files this process holds -> (holder key, nested blocks)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float  # the process's start time: with the pid, who it is on its host
    pid_namespace: int  # containers on one host with one hostname see different pids
    slurm_job: str  # the job (an array's base id) it runs in; '' outside SLURM
    job_wide: bool  # every task of slurm_job is this holder
    command: str
    since: str

    @property
    def key(self) -> str:
        if self.job_wide:
            return f"slurm job {self.slurm_job}"
        return f"{self.host} {self.pid_namespace} {self.pid} {self.pid_started:.2f}"

    def describe(self) -> str:
        who = f"pid {self.pid} on {self.host}"
        if self.job_wide:
            who = f"SLURM job {self.slurm_job} ({who})"
        elif self.slurm_job:
            who += f" in SLURM job {self.slurm_job}"
        return f"{who} since {self.since} ({self.command})"


def this_process() -> Holder:
    return _holder(job_wide=False)


def this_job() -> Holder:
    """The SLURM job this task belongs to (all its tasks are one holder); this process outside SLURM."""
    return _holder(job_wide=bool(_job_id()))


def _job_id() -> str:
    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or ""


def _holder(job_wide: bool) -> Holder:
    me = psutil.Process()
    return Holder(socket.gethostname(), me.pid, me.create_time(), _pid_namespace(), _job_id(), job_wide,
                  " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
                  time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@contextlib.contextmanager
def holding(run_dir: RunDir, holder: Holder, keep: bool = False) -> Iterator[None]:
    """Hold the run directory's lock for the block. A process lets go at the end whatever happens; a
    job lets go only after a block that succeeded without `keep` (its other tasks may still work, a
    requeued job comes back to its lock), else the lock ends when SLURM says the job has."""
    acquire(run_dir, holder)
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        release(run_dir, holder, remove=not holder.job_wide or (succeeded and not keep))


def acquire(run_dir: RunDir, holder: Holder) -> None:
    """Take the lock for `holder`, share it with its own job, take over a stale one, or refuse."""
    path = run_dir.lock_file.resolve()  # one key per file, however the run directory is spelled
    if _HELD.get(path, ("", 0))[0] == holder.key:
        _HELD[path] = (holder.key, _HELD[path][1] + 1)
        return
    run_dir.create()  # whoever comes first makes it, with the run directory's own mode
    mine = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
    _write_synced(mine, json.dumps(asdict(holder), indent=2) + "\n")
    try:
        for _ in range(ATTEMPTS):
            if _link(mine, path) or _shared_or_taken_over(path, holder):
                _HELD[path] = (holder.key, 1)
                return
    finally:
        mine.unlink(missing_ok=True)
    raise UserError(f"{path}: other writers took and left this lock {ATTEMPTS} times meanwhile; try again")


def release(run_dir: RunDir, holder: Holder, remove: bool = True) -> None:
    """Let go of the lock (at the outermost block of this process): the file goes when `remove` and it
    is still ours; without `remove` it stays for the holder's other tasks (or until SLURM says the
    job ended)."""
    path = run_dir.lock_file.resolve()
    key, depth = _HELD.pop(path, (holder.key, 1))
    if depth > 1:
        _HELD[path] = (key, depth - 1)
        return
    found = _read(path) if remove else None
    if found is not None and found[0] is not None and found[0].key == holder.key:
        path.unlink(missing_ok=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _link(mine: Path, path: Path) -> bool:
    """Whether `mine` is now also `path`. Over NFS a lost reply can make a link that succeeded
    report EEXIST: the unique file's link count decides (open(2))."""
    try:
        os.link(mine, path)
    except FileExistsError:
        pass
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        return _create_exclusive(mine, path)  # a filesystem without hard links
    return os.stat(mine).st_nlink == 2


def _create_exclusive(mine: Path, path: Path) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(mine.read_text(encoding="utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _read(path: Path) -> tuple[Holder | None, int] | None:
    """(holder, inode) of the lock file; holder None when unreadable; None when there is no file."""
    try:
        with open(path, encoding="utf-8") as handle:
            inode, text = os.fstat(handle.fileno()).st_ino, handle.read()
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text)), inode
    except (ValueError, TypeError):
        return None, inode


def _shared_or_taken_over(path: Path, holder: Holder) -> bool:
    """True when the lock is this holder's own (its job's); False to try again (it was stale and is
    gone now); a UserError naming the holder when it still writes or cannot be checked."""
    found = _read(path)
    if found is None:
        return False  # released meanwhile
    other, inode = found
    if other is None:
        raise UserError(f"{path}: unreadable lock file; delete it if no ftpipe process or SLURM job "
                        f"writes {path.parent} any more")
    if other.key == holder.key or (other.job_wide and other.slurm_job == holder.slurm_job):
        return True
    _check_gone(path, other)
    _take_over(path, inode, other)
    return False


def _check_gone(path: Path, other: Holder) -> None:
    """Return when `other` no longer writes; a UserError naming it when it does or may."""
    busy = f"{path.parent} is in use by {other.describe()}"
    if not other.job_wide and (other.host, other.pid_namespace) == (socket.gethostname(), _pid_namespace()):
        if _process_runs(other):
            raise UserError(f"{busy}; wait for it to finish")
        return
    if not other.slurm_job:
        raise UserError(f"{busy}, which cannot be checked from {socket.gethostname()}; "
                        f"if it no longer runs, delete {path}")
    try:
        state = slurm_states([other.slurm_job], strict=True).get(other.slurm_job, ("", ""))[0]
    except UserError as err:
        raise UserError(f"{busy}, and {err}; if it no longer runs, delete {path}") from None
    if state in (QUEUED | RUNNING) - ENDING:
        raise UserError(f"{busy} ({state.lower()}); wait for it, or `scancel {other.slurm_job}`")


def _process_runs(other: Holder) -> bool:
    try:
        process = psutil.Process(other.pid)
        return (process.status() != psutil.STATUS_ZOMBIE
                and abs(process.create_time() - other.pid_started) < 1.0)
    except psutil.Error:
        return False


def _take_over(path: Path, inode: int, other: Holder) -> None:
    """Remove the stale lock `inode`, unless another writer replaced it meanwhile (it then goes back)."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another writer took it over first
    if os.stat(aside).st_ino != inode:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    else:
        log.warning("%s: taking over the lock of %s, which no longer runs", path.parent, other.describe())
    aside.unlink()
