"""`ftpipe submit`: one SLURM job per stage that is not up to date, chained with afterok.

Every job runs `StageJob(run_dir, stage, cwd)`, which executes exactly what `ftpipe run --stages
STAGE` runs (plan + run_pipeline). The train job has one task per node; each task starts one
torchrun whose rendezvous host is the allocation's first node.

Also a command line for batch scripts written by hand (slurm/*.sbatch):
    python -m launch.slurm prepare CONFIG [KEY=VALUE ...]   write RUN_DIR/config.yaml, print RUN_DIR
    python -m launch.slurm run-stage RUN_DIR STAGE          run STAGE here (one task per node)
    python -m launch.slurm run-array-task RUN_DIR STAGE     this array task's share of STAGE's ranks
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import submitit

from launch.local import parent_tags, write_run_config
from launch.process import STOPPED_EXIT, reporting_errors
from launch.run_lock import holding, this_job, this_process
from launch.slurm_arrays import ArrayTask, enter_job, pending_ranks, task_count, task_groups
from launch.slurm_jobs import JobRecord, active_jobs, read_jobs, record_jobs, record_outcome
from launch.slurm_rendezvous import slurm_rendezvous
from launch.torchrun import run_torchrun, torchrun_command
from pipeline.config import RunConfig, load_config
from pipeline.digests import weight_bytes
from pipeline.errors import StagePreempted, UserError
from pipeline.run_dir import RunDir, atomic_write_text
from pipeline.runner import PlannedStage
from pipeline.secrets import private_files
from pipeline.stages import STAGES, Stage
from pipeline.tracking import build_tracker, create_parent_run, read_parent, write_parent

log = logging.getLogger("ftpipe")


# --- what runs inside a job ------------------------------------------------------------------


class StageJob(submitit.helpers.Checkpointable):
    """A picklable (run_dir, stage, cwd); requeued after the time-limit signal (SIGUSR1/2), the stage
    then resumes. After SIGTERM it saves and stops with exit code 75, not requeued."""

    def __init__(self, run_dir: str, stage: str, cwd: str):
        self.run_dir, self.stage, self.cwd = run_dir, stage, cwd

    def __call__(self) -> str:
        run_dir = RunDir(Path(self.run_dir))
        try:
            run_stage_job(run_dir.root, self.stage, Path(self.cwd))
        except StagePreempted as stopped:
            record_outcome(run_dir, "stopped")
            requeue_unless_ending(stopped, load_config(run_dir.config_file).launch.slurm.max_requeues)
        except BaseException:
            record_outcome(run_dir, "failed")
            raise
        record_outcome(run_dir, "done")
        return self.stage


def requeue_unless_ending(stopped: StagePreempted, max_requeues: int) -> NoReturn:
    """After the time-limit signal requeue the job; after SIGTERM exit 75: the job is ending for good
    (scancel, or preemption, where SLURM requeues the job itself if PreemptMode=REQUEUE), and what
    the user or the cluster asked for stands."""
    if stopped.signum == signal.SIGTERM:
        log.warning("%s; job %s not requeued (SIGTERM: cancelled or preempted); `ftpipe submit` resumes it",
                    stopped, os.environ.get("SLURM_JOB_ID"))
        raise SystemExit(STOPPED_EXIT)
    requeue_this_job(str(stopped), max_requeues)


def requeue_this_job(why: str, max_requeues: int) -> NoReturn:
    """Put this job back in the queue (it resumes from the checkpoint just written), or fail."""
    job_id = os.environ["SLURM_JOB_ID"]
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        raise UserError(f"{why}; not requeued: job {job_id} already ran {restarts + 1} times "
                        f"(launch.slurm.max_requeues is {max_requeues}); `ftpipe submit` again resumes it")
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:  # the checkpoint is there either way; say why the job is not back
        said = done.stderr.strip().removeprefix("scontrol: error: ") or f"scontrol exit {done.returncode}"
        log.warning("%s; job %s not requeued (%s); `ftpipe submit` resumes it", why, job_id, said)
        raise SystemExit(STOPPED_EXIT)
    log.warning("%s; requeued job %s (requeue %d of %d)", why, job_id, restarts + 1, max_requeues)
    # SystemExit, not a return: submitit would record the stage as finished.
    raise SystemExit(0)


def run_stage_job(run_dir: Path, stage: str, cwd: Path) -> None:
    """`ftpipe run --stages STAGE` on node 0; on the other nodes of a train job only their torchrun."""
    from launch.local import run_pipeline
    from pipeline.runner import plan

    cfg = enter_job(run_dir, cwd)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    if STAGES[stage].distributed and cfg.launch.backend == "slurm":
        cfg = cfg.model_copy(update={"launch": slurm_rendezvous(cfg, node)})
    # Every node's task holds the job's lock; node 0 lets go once the stage is done.
    with holding(RunDir(run_dir), this_job(), keep=node != 0):
        if node != 0:
            _torchrun_only(cfg, run_dir, stage)
            return
        run_pipeline(cfg, plan(cfg, [stage]), progress=False)


def _torchrun_only(cfg: RunConfig, run_dir: Path, stage: str) -> None:
    # A stop signal ends this node's ranks with code 0; node 0 requeues the job.
    code, _ = run_torchrun(torchrun_command(cfg.launch, cfg.name, [str(run_dir), stage, "--no-progress"]))
    if code != 0:
        raise RuntimeError(f"{stage}: torchrun on node {cfg.launch.node_rank} exited with code {code}")


# --- sbatch parameters -----------------------------------------------------------------------


def job_parameters(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of STAGE's job (submitit shlex-quotes every value)."""
    slurm, train, gpu = cfg.launch.slurm, STAGES[stage].distributed, needs_gpu(STAGES[stage], cfg)
    params: dict[str, Any] = {
        "job_name": f"ftpipe-{cfg.name}-{stage}", "time": slurm.time,
        "nodes": cfg.launch.nnodes if train else 1, "ntasks_per_node": 1,
        "signal_delay_s": slurm.signal_lead_seconds, "setup": list(slurm.setup),
        "partition": slurm.partition if gpu else (slurm.cpu_partition or slurm.partition),
        "account": slurm.account, "qos": slurm.qos, "cpus_per_task": slurm.cpus_per_task, "mem": slurm.mem,
        "constraint": slurm.constraint,
    }
    if train and slurm.exclusive:
        params["exclusive"] = True
    if train:
        # preempted/time-limited jobs go back in the queue
        params["additional_parameters"] = {"requeue": True}
    if gpu and gpus_per_node(cfg):
        params["gpus_per_node"] = gpus_per_node(cfg)
    if slurm.extra_directives:
        directives = (_directive(item) for item in slurm.extra_directives)
        params.setdefault("additional_parameters", {}).update(directives)
    return {k: v for k, v in params.items() if v is not None}


def needs_gpu(spec: Stage, cfg: RunConfig) -> bool:
    """Whether SPEC's job goes to the GPU partition: always (train), or when the model is large
    (evaluate: its weight files over launch.slurm.large_model_gb; a hub id's size is unknown here)."""
    if spec.gpu or not spec.gpu_for_large_model:
        return spec.gpu
    size = weight_bytes(cfg.model.name_or_path)
    return size is None or size > cfg.launch.slurm.large_model_gb * 1e9


def gpus_per_node(cfg: RunConfig) -> int | None:
    """GPUs a GPU-partition job asks for per node: launch.slurm.gpus_per_node when set, else one per
    rank (none when training on the CPU). Config validation makes 'gpu' ranks name gpus_per_node."""
    if cfg.launch.slurm.gpus_per_node is not None or cfg.train.device == "cpu":
        return cfg.launch.slurm.gpus_per_node
    per_node = cfg.launch.nproc_per_node
    assert per_node != "gpu", "validation requires launch.slurm.gpus_per_node with nproc_per_node 'gpu'"
    return per_node


def _directive(item: str) -> tuple[str, Any]:
    name, sep, value = item.lstrip("-").partition("=")
    return name, value if sep else True


def stage_command(run_dir: Path, stage: str, cwd: Path, array: bool = False) -> str:
    """The command a hand-run script uses instead of submitit's pickle: the same StageJob (or
    ArrayTask)."""
    args = [sys.executable, "-u", "-m", "launch.slurm", "run-array-task" if array else "run-stage",
            str(run_dir), stage, "--cwd", str(cwd)]
    return shlex.join(args)


def render_script(cfg: RunConfig, stage: str, run_dir: RunDir, cwd: Path,
                  array_tasks: int | None = None) -> str:
    """The sbatch script of STAGE's job (or its job array), as submitit renders it, runnable without
    submitit's pickle."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=stage_command(run_dir.root, stage, cwd, array=array_tasks is not None),
                               folder=str(run_dir.slurm_dir / "%j"), map_count=array_tasks,
                               **job_parameters(cfg, stage))


# --- submission ------------------------------------------------------------------------------


def to_submit(planned: list[PlannedStage]) -> list[str]:
    return [s.name for s in planned if s.action in ("run", "resume")]


def dry_run(cfg: RunConfig, stages: list[str], cwd: Path) -> list[Path]:
    """Write the scripts `submit` would send, each saying what it depends on; submit nothing."""
    run_dir = write_run_config(cfg)
    folder = run_dir.slurm_dir / "dry-run"
    folder.mkdir(parents=True, exist_ok=True)
    scripts = []
    for stage in stages:
        if STAGES[stage].units is not None:
            tasks = len(task_groups(list(range(task_count(cfg, run_dir, stage))),
                                    cfg.launch.slurm.max_array_tasks))
            scripts.append((f"{stage}-array", render_script(cfg, stage, run_dir, cwd, tasks)))
        scripts.append((stage, render_script(cfg, stage, run_dir, cwd)))
    written = []
    for index, (name, text) in enumerate(scripts):
        path = folder / f"{index:02d}-{name}.sbatch"
        header, _, body = text.partition("\n")
        # submit adds the dependency on the command line; an #SBATCH line cannot hold a job id not yet known.
        how = (f"sbatch --dependency=afterok:<job id of {index - 1:02d}-{scripts[index - 1][0]}> {path.name}"
               if index else f"sbatch {path.name}")
        # owner-only, as submitted scripts are: setup lines may export tokens
        atomic_write_text(path, f"{header}\n# ftpipe submit --dry-run; by hand: {how}\n{body}", private=True)
        written.append(path)
    return written


def submit(cfg: RunConfig, stages: list[str], cwd: Path, after: str | None = None,
           parent_of: str | None = None) -> list[JobRecord]:
    """Submit one job per stage, each after the previous one succeeded (shard and tokenize after
    their job arrays), the first after job `after`; record them in jobs.json. Their MLflow stage
    runs go under one parent run (nested under `parent_of`, a sweep's, when given)."""
    run_dir = RunDir(cfg.run_dir.resolve())
    with submitting(run_dir):
        check_idle(run_dir)
        # Only now: queued jobs read config.yaml when they start.
        write_run_config(cfg)
        return _submit_stages(cfg, run_dir, stages, cwd, after, parent_of)


def check_idle(run_dir: RunDir) -> None:
    """A UserError when jobs of this run are queued or running, or SLURM cannot say."""
    try:
        busy = active_jobs(read_jobs(run_dir))
    except UserError as err:  # never assume that nothing runs
        raise UserError(f"{run_dir.root}: not submitting: {err}; retry when SLURM answers") from None
    if busy:
        ids = ", ".join(j.job_id for j in busy)
        raise UserError(f"{run_dir.root}: jobs {ids} of this run are still queued or running; "
                        f"wait, or `ftpipe cancel {run_dir.root}` first")


def _submit_stages(cfg: RunConfig, run_dir: RunDir, stages: list[str], cwd: Path, after: str | None,
                   parent_of: str | None) -> list[JobRecord]:
    parent_run(cfg, parent_of)
    records: list[JobRecord] = []
    previous: str | None = after
    for index, stage in enumerate(stages):
        array_id = None
        if STAGES[stage].units is not None:
            ranks = pending_ranks(cfg, run_dir, stage, upstream_redone=index > 0)
            array_id = _submit_array(cfg, run_dir, stage, cwd, ranks, previous) if ranks else None
        job = submit_job(cfg, stage, StageJob(str(run_dir.root), stage, str(cwd)), array_id or previous,
                          lambda executor, fn: executor.submit(fn))
        previous = job.job_id
        records.append(JobRecord(stage, job.job_id, str(job.paths.stdout), str(job.paths.stderr),
                                 array_id or ""))
        record_jobs(run_dir, records)  # after every job: a failure later still leaves the earlier ones known
    return records


def parent_run(cfg: RunConfig, parent_of: str | None = None) -> str | None:
    """The MLflow parent run the jobs of this run directory attach to: the recorded one, else a new one."""
    tracker = build_tracker(cfg)
    if tracker is None:
        return None
    run_dir = RunDir(cfg.run_dir.resolve())
    found = read_parent(run_dir, tracker.uri)
    if found:
        return found
    run_id = create_parent_run(tracker, cfg.model_dump(mode="json"), parent_tags(cfg, run_dir, parent_of))
    if run_id:
        write_parent(run_dir, tracker.uri, run_id)
    return run_id


_on_hold: list[str] | None = None  # jobs the `submitting` block in progress submitted on hold


@contextlib.contextmanager
def submitting(run_dir: RunDir) -> Iterator[None]:
    """Hold the run's lock while submitting. The jobs go in on hold and are released only once the
    lock is let go: a job that started meanwhile would find the lock taken by this very submission.
    Nested blocks (a sweep's members) take their own run's lock; the outermost releases the jobs."""
    global _on_hold
    outermost = _on_hold is None
    if outermost:
        _on_hold = []
    try:
        with holding(run_dir, this_process()):
            yield
    finally:
        if outermost:
            held, _on_hold = _on_hold, None
            if held:
                _release(held)


def _release(job_ids: list[str]) -> None:
    listed = ",".join(job_ids)
    done = subprocess.run(["scontrol", "release", listed], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise UserError(f"jobs {listed} were submitted on hold and could not be released "
                        f"({_last_line(done.stderr)}): `scontrol release {listed}`")


def submit_job(cfg: RunConfig, stage: str, fn: Any, after: str | None, how: Any,
               kind: str = "afterok") -> Any:
    """Submit `fn` with STAGE's job parameters, after job(s) `after` (a:b:c) under dependency `kind`.
    The batch script (setup lines may export tokens), the job's pickle and its logs are owner-only:
    sbatch hands its umask on to the job."""
    executor = submitit.SlurmExecutor(folder=cfg.run_dir.resolve() / "slurm" / "%j",
                                      max_num_timeout=cfg.launch.slurm.max_requeues)
    params = job_parameters(cfg, stage)
    if _on_hold is not None:
        params["additional_parameters"] = {**params.get("additional_parameters", {}), "hold": True}
    executor.update_parameters(**params, **({"dependency": f"{kind}:{after}"} if after else {}))
    try:
        with private_files():
            submitted = how(executor, fn)
    except submitit.core.utils.FailedJobError as err:
        raise UserError(f"sbatch refused the {stage} job: {_last_line(str(err))}") from None
    if _on_hold is not None:
        first = submitted[0] if isinstance(submitted, list) else submitted
        _on_hold.append(first.job_id.split("_")[0])  # an array's id releases all its tasks
    return submitted


def _submit_array(cfg: RunConfig, run_dir: RunDir, stage: str, cwd: Path, ranks: list[int],
                  after: str | None) -> str:
    """The stage's pending ranks as one job array; its job id (every task shares it)."""
    groups = task_groups(ranks, cfg.launch.slurm.max_array_tasks)
    jobs = submit_job(cfg, stage, ArrayTask(str(run_dir.root), stage, str(cwd)), after,
                       lambda executor, fn: executor.map_array(fn, groups))
    return jobs[0].job_id.split("_")[0]


def _last_line(text: str) -> str:
    lines = [line.removeprefix("sbatch: error: ") for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


# --- the command line for hand-written batch scripts -----------------------------------------


def _ran(job: StageJob | ArrayTask) -> int:
    job()
    return 0


def _prepare(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    with holding(RunDir(cfg.run_dir.resolve()), this_process()):
        print(write_run_config(cfg).root)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"] and len(argv) >= 2:
        return reporting_errors(lambda: _prepare(argv[1], argv[2:]))
    if argv[:1] in (["run-stage"], ["run-array-task"]) and len(argv) >= 3:
        cwd = Path(argv[argv.index("--cwd") + 1]) if "--cwd" in argv else Path.cwd()
        job_class = StageJob if argv[0] == "run-stage" else ArrayTask
        job = job_class(str(Path(argv[1]).resolve()), argv[2], str(cwd))
        return reporting_errors(lambda: _ran(job))
    print("usage: python -m launch.slurm prepare CONFIG [KEY=VALUE ...] | run-stage RUN_DIR STAGE [--cwd DIR]"
          " | run-array-task RUN_DIR STAGE [--cwd DIR]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
