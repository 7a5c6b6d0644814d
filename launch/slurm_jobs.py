"""The SLURM jobs of a run directory: RUN_DIR/slurm/jobs.json, their states, cancel, logs.

States come from sacct when accounting works, else from squeue (which still lists finished jobs
for MinJobAge seconds), else from the run directory itself: a stage with a manifest is done, and
the outcome file each stage job writes says whether it failed. (Never submitit's result pickle:
unpickling a file in the run directory could run whatever code someone put there.)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.run_dir import RunDir, atomic_write_json
from pipeline.stages import NAMES
from pipeline.stages import stage as declared_stage

QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}
OUTCOME_FILE = "outcome.json"  # slurm/JOB_ID/outcome.json, written by the stage job itself


@dataclass(frozen=True)
class JobRecord:
    stage: str
    job_id: str
    stdout: str
    stderr: str
    array_job_id: str = ""  # shard, tokenize: the job array the stage's own job waits for

    @property
    def job_ids(self) -> list[str]:
        return [i for i in (self.array_job_id, self.job_id) if i]


def read_jobs(run_dir: RunDir) -> list[JobRecord]:
    path = run_dir.jobs_file
    if not path.is_file():
        return []
    try:
        return [JobRecord(**item) for item in json.loads(path.read_text())["jobs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def record_jobs(run_dir: RunDir, new: list[JobRecord]) -> None:
    """A stage's newest job replaces its older one; stages not resubmitted keep theirs."""
    by_stage = {j.stage: j for j in read_jobs(run_dir)} | {j.stage: j for j in new}
    jobs = [asdict(by_stage[s]) for s in NAMES if s in by_stage]
    atomic_write_json(run_dir.jobs_file, {"jobs": jobs})


def _run(cmd: list[str]) -> tuple[str | None, str]:
    """(stdout, '') or, when the command gave no answer, (None, why). `squeue -j` of jobs SLURM has
    forgotten (MinJobAge) fails with 'Invalid job id': an answer, they are neither queued nor running."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{cmd[0]}: {err}"
    if done.returncode == 0 or "Invalid job id" in done.stderr:
        return (done.stdout if done.returncode == 0 else ""), ""
    lines = (done.stderr or done.stdout).strip().splitlines()
    why = lines[-1] if lines else f"exit code {done.returncode}"
    return None, why if why.startswith(cmd[0]) else f"{cmd[0]}: {why}"


def _telling(a: tuple[str, str] | None, b: tuple[str, str]) -> tuple[str, str]:
    """Of two tasks' states, the one that says most about their array: running, queued, failed, done."""
    def order(state: str) -> int:
        return 0 if state in RUNNING else 1 if state in QUEUED else 3 if state == "COMPLETED" else 2
    return b if a is None or order(b[0]) < order(a[0]) else a


def _collect(out: str, job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """'ID|STATE[|REASON]' lines; array tasks (ID_N) count toward their array's base id."""
    found: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        base = job_id.split("_")[0]
        if base in job_ids and state:
            reason = "" if reason in ("None", "(null)") else reason
            found[base] = _telling(found.get(base), (state.split()[0], reason))
    return found


def slurm_states(job_ids: list[str], strict: bool = False) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) from squeue, completed by sacct where accounting is on. `strict`:
    a UserError when neither answers (no state is then not the same as not running)."""
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    accounted, sacct_error = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ids])
    # %i is ID_N for array tasks (and ID_[1-3] while pending); the base id groups them.
    queued, squeue_error = _run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r", "-j", ids])
    if strict and accounted is None and queued is None:
        jobs = f"job{'s' if len(job_ids) > 1 else ''} {', '.join(job_ids)}"
        raise UserError(f"SLURM cannot be asked about {jobs}: squeue and sacct gave no answer "
                        f"({squeue_error}; {sacct_error})")
    states = _collect(accounted or "", job_ids)
    states.update(_collect(queued or "", job_ids))
    return states


def active_jobs(jobs: list[JobRecord]) -> list[JobRecord]:
    """Those of `jobs` queued or running; a UserError when SLURM cannot be asked."""
    states = slurm_states([i for j in jobs for i in j.job_ids], strict=True)
    return [j for j in jobs if any(states.get(i, ("", ""))[0] in QUEUED | RUNNING for i in j.job_ids)]


def record_outcome(run_dir: RunDir, outcome: str) -> None:
    """Inside a stage job (node 0): 'done', 'failed' or 'stopped', for `ftpipe status` to read."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id and os.environ.get("SLURM_NODEID", "0") == "0":
        atomic_write_json(run_dir.slurm_dir / job_id / OUTCOME_FILE, {"job_id": job_id, "outcome": outcome})


def _outcome(job: JobRecord) -> str | None:
    """What the job's outcome file says, None while there is none (beside its logs: slurm/ID/)."""
    try:
        return str(json.loads(Path(job.stdout).with_name(OUTCOME_FILE).read_text())["outcome"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_state(run_dir: RunDir, stage: str, job: JobRecord | None, slurm: tuple[str, str] | None,
                array: tuple[str, str] | None = None) -> str:
    state, reason = slurm or ("", "")
    if array and array[0] in RUNNING:
        return "running (array tasks)"
    if array and array[0] in QUEUED:
        return "queued (array tasks)"
    if array and array[0] != "COMPLETED" and run_dir.read_manifest(stage) is None:
        return f"{array[0].lower()} (an array task)"
    if state in QUEUED:
        return f"queued ({reason})" if reason else "queued"
    if state in RUNNING:
        return "running"
    if run_dir.read_manifest(stage) is not None:
        return "done"
    if job is None:
        return "partial" if run_dir.stage(stage).exists() else "pending"
    if state and state != "COMPLETED":
        return state.lower()  # failed, cancelled, timeout, out_of_memory, node_fail, ...
    outcome = _outcome(job)
    if outcome == "stopped":
        return "stopped (submit again to resume)"
    return "failed" if outcome == "failed" or state == "COMPLETED" else "unknown (job gone from squeue)"


def status_lines(run_dir: RunDir) -> list[str]:
    return [f"  {stage:<11} {state:<24} {ids}".rstrip() for stage, state, ids in stage_states(run_dir)]


def stage_states(run_dir: RunDir) -> list[tuple[str, str, str]]:
    """(stage, state, job ids) of every stage of a submitted run."""
    jobs = {j.stage: j for j in read_jobs(run_dir)}
    states = slurm_states([i for j in jobs.values() for i in j.job_ids])
    lines, broken = [], None
    for stage in NAMES:
        job = jobs.get(stage)
        array = states.get(job.array_job_id) if job and job.array_job_id else None
        state = stage_state(run_dir, stage, job, states.get(job.job_id) if job else None, array)
        if broken and state.startswith("queued"):
            # afterok on a failed job: SLURM keeps it pending forever (reason DependencyNeverSatisfied).
            state = f"blocked ({broken} did not finish)"
        elif not broken and job and not state.startswith(("queued", "running", "done")):
            broken = stage
        ids = (f"job {job.job_id}" + (f" (array {job.array_job_id})" if job.array_job_id else "")
               if job else "")
        lines.append((stage, state, ids))
    return lines


def cancel(run_dir: RunDir) -> list[JobRecord]:
    return cancel_jobs(read_jobs(run_dir))


def cancel_jobs(jobs: list[JobRecord]) -> list[JobRecord]:
    """scancel those of `jobs` (and their arrays) still queued or running; return them."""
    jobs = active_jobs(jobs)
    if jobs:
        done = subprocess.run(["scancel", *[i for j in jobs for i in j.job_ids]], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise UserError(f"scancel failed: {done.stderr.strip() or done.returncode}")
    return jobs


def log_files(run_dir: RunDir, stage: str) -> list[Path]:
    """The stage's job logs: its array tasks' (unit-wise stages), task 0's stdout and stderr, then
    the other nodes' tasks."""
    declared_stage(stage)  # an unknown name is a one-line error
    job = {j.stage: j for j in read_jobs(run_dir)}.get(stage)
    if job is None:
        raise UserError(f"{run_dir.root}: no SLURM job recorded for stage {stage} (see {run_dir.jobs_file})")
    folder = Path(job.stdout).parent
    main = [Path(job.stdout), Path(job.stderr)]
    others = sorted(p for p in folder.glob(f"{job.job_id}_*_log.*") if p not in main)
    # submitit submits a one-task array as a plain job: logs under ID/, else under ID_N/.
    arrays = [p for pattern in (f"{job.array_job_id}/*_log.*", f"{job.array_job_id}_*/*_log.*")
              for p in sorted(folder.parent.glob(pattern))] if job.array_job_id else []
    return [p for p in arrays + main + others if p.is_file()]


def follow(run_dir: RunDir, stage: str, write: Callable[[str], None], poll_s: float = 1.0) -> None:
    """`tail -f` of the stage's job logs (new files too, e.g. array tasks starting) until its job is
    neither queued nor running, then what was written last."""
    offsets: dict[Path, int] = {}
    while True:
        job = {j.stage: j for j in read_jobs(run_dir)}.get(stage)
        running = bool(job and active_jobs([job]))
        for path in log_files(run_dir, stage):
            with open(path, "rb") as handle:
                handle.seek(offsets.get(path, 0))
                chunk = handle.read()
            if chunk:
                if path not in offsets:
                    write(f"==> {path} <==\n")
                offsets[path] = offsets.get(path, 0) + len(chunk)
                write(chunk.decode(errors="replace"))
        if not running:
            return
        time.sleep(poll_s)
