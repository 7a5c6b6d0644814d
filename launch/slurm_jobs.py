"""The SLURM jobs of a run directory: RUN_DIR/slurm/jobs.json, their states, cancel, logs.

States come from sacct when accounting works, else from squeue (which still lists finished jobs
for MinJobAge seconds), else from the run directory itself: a stage with a manifest is done, and
submitit's result file says whether a finished job's function raised.
"""

from __future__ import annotations

import json
import pickle
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.run_dir import STAGES, RunDir, atomic_write_json

JOBS_FILE = "jobs.json"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


@dataclass(frozen=True)
class JobRecord:
    stage: str
    job_id: str
    stdout: str
    stderr: str


def jobs_path(run_dir: Path) -> Path:
    return Path(run_dir) / "slurm" / JOBS_FILE


def read_jobs(run_dir: Path) -> list[JobRecord]:
    path = jobs_path(run_dir)
    if not path.is_file():
        return []
    try:
        return [JobRecord(**item) for item in json.loads(path.read_text())["jobs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def record_jobs(run_dir: Path, new: list[JobRecord]) -> None:
    """A stage's newest job replaces its older one; stages not resubmitted keep theirs."""
    by_stage = {j.stage: j for j in read_jobs(run_dir)} | {j.stage: j for j in new}
    jobs = [asdict(by_stage[s]) for s in STAGES if s in by_stage]
    atomic_write_json(jobs_path(run_dir), {"jobs": jobs})


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) from squeue, completed by sacct where accounting is on."""
    if not job_ids:
        return {}
    states: dict[str, tuple[str, str]] = {}
    out = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]) or ""
    for line in out.splitlines():
        job_id, _, state = line.partition("|")
        if job_id in job_ids and state:
            states[job_id] = (state.split()[0], "")
    out = _run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(job_ids)]) or ""
    for line in out.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        if job_id in job_ids:
            states[job_id] = (state, "" if reason in ("None", "(null)") else reason)
    return states


def active_jobs(jobs: list[JobRecord]) -> list[JobRecord]:
    states = slurm_states([j.job_id for j in jobs])
    return [j for j in jobs if states.get(j.job_id, ("", ""))[0] in QUEUED | RUNNING]


def _result(job: JobRecord) -> str | None:
    """'success' or 'error' from submitit's result pickle of task 0, None while there is none."""
    path = Path(job.stdout).with_name(f"{job.job_id}_0_result.pkl")
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)[0]
    except (OSError, EOFError, pickle.UnpicklingError, IndexError, TypeError):
        return None


def stage_state(run_dir: RunDir, stage: str, job: JobRecord | None, slurm: tuple[str, str] | None) -> str:
    state, reason = slurm or ("", "")
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
    return "failed" if _result(job) == "error" or state == "COMPLETED" else "unknown (job gone from squeue)"


def status_lines(run_dir: Path) -> list[str]:
    rd, jobs = RunDir(Path(run_dir)), {j.stage: j for j in read_jobs(run_dir)}
    states = slurm_states([j.job_id for j in jobs.values()])
    lines, broken = [], None
    for stage in STAGES:
        job = jobs.get(stage)
        state = stage_state(rd, stage, job, states.get(job.job_id) if job else None)
        if broken and state.startswith("queued"):
            # afterok on a failed job: SLURM keeps it pending forever (reason DependencyNeverSatisfied).
            state = f"blocked ({broken} did not finish)"
        elif not broken and job and not state.startswith(("queued", "running", "done")):
            broken = stage
        lines.append(f"  {stage:<11} {state:<24} {'job ' + job.job_id if job else ''}".rstrip())
    return lines


def cancel(run_dir: Path) -> list[JobRecord]:
    jobs = active_jobs(read_jobs(run_dir))
    if jobs:
        done = subprocess.run(["scancel", *[j.job_id for j in jobs]], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"scancel failed: {done.stderr.strip() or done.returncode}")
    return jobs


def log_files(run_dir: Path, stage: str) -> list[Path]:
    """The stage's job logs: task 0's stdout and stderr, then the other nodes' tasks."""
    job = {j.stage: j for j in read_jobs(run_dir)}.get(stage)
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if job is None:
        raise UserError(f"{run_dir}: no SLURM job recorded for stage {stage} (see {jobs_path(run_dir)})")
    folder = Path(job.stdout).parent
    main = [Path(job.stdout), Path(job.stderr)]
    others = sorted(p for p in folder.glob(f"{job.job_id}_*_log.*") if p not in main)
    return [p for p in main + others if p.is_file()]
