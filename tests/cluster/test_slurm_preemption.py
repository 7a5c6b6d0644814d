"""Stopping a SLURM train job: a time-limit signal (`--signal=USR2`) and a plain `scancel` (SIGTERM)
make every rank save the same step; the job requeues itself or is resubmitted, and resumes with no
sample lost or trained twice. Real 1-node cluster, like test_slurm.py (same xdist group)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from launch.slurm_jobs import read_jobs, status_lines
from pipeline.run_dir import RunDir
from tests import fixtures
from tests.cluster.test_slurm import wait_for
from tests.helpers import ftpipe, manifest


@pytest.fixture(autouse=True)
def no_jobs_left(slurm_cluster):
    """A failed test must not leave jobs that hold the cluster's CPUs from the tests after it."""
    yield
    slurm_cluster.cancel_all_jobs()


def test_a_signalled_train_job_saves_every_rank_requeues_and_resumes(slurm_cluster, tmp_path, tiny_llama,
                                                                      text_data):
    """`scancel --signal=USR2` signals every process of the job's steps, as `--signal=USR2@lead` does
    before the time limit: the two FSDP ranks save one step together, the job requeues itself, and
    the requeued run resumes there with no sample lost or trained twice."""
    train = {"strategy": "fsdp", "max_steps": 60, "micro_batch_size": 2, "global_batch_size": 8,
             "checkpoint_every": 1000, "keep_last": 5, "sample_ledger": True,
             "device": "cpu"}  # this cluster has no GPUs
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, name="pre", train=train,
                                 launch={"backend": "slurm", "nproc_per_node": 2,
                                         "slurm": {"max_requeues": 2}})
    config = fixtures.write_config(tmp_path / "pre.yaml", cfg)
    assert ftpipe("run", config, "--stages", "shard,tokenize", "--no-progress") == 0  # no data jobs needed
    assert ftpipe("submit", config, "--stages", "train") == 0
    run = RunDir(tmp_path / "runs" / "pre")
    job = next(j for j in read_jobs(run) if j.stage == "train")
    metrics = run.root / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert time.monotonic() < deadline, status_lines(run)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], env=slurm_cluster.env, check=True)
    _wait_for_requeue(slurm_cluster, job.job_id)
    lines = wait_for(run, timeout=300)
    assert all(line.split()[1] == "done" for line in lines[:3]), (
        "\n".join(lines) + Path(job.stderr).read_text()[-3000:])
    log = Path(job.stderr).read_text()
    assert "stopped on SIGUSR2 at step" in log and "requeued job" in log
    stopped_at = manifest(run, "train")["resumed_from_step"]
    assert stopped_at is not None and 5 <= stopped_at < 60
    _assert_each_sample_once(run, steps=60, global_batch=8)


def test_a_plain_scancel_saves_every_rank_and_a_resubmitted_job_resumes_exactly(slurm_cluster, tmp_path,
                                                                                tiny_llama, text_data):
    """A plain `scancel JOB`, like preemption, sends SIGTERM to every process of the job (the batch
    script, srun, the job's task, torchrun, both ranks) and SIGKILL KillWait (5 s here) later: the two
    FSDP ranks save one step together within that time and the job stops with exit code 75. scancel's
    cancel is final (the job cannot requeue itself), so the train job is submitted again: it resumes
    there with no sample lost or trained twice."""
    from launch.slurm import submit
    from pipeline.config import load_config

    train = {"strategy": "fsdp", "max_steps": 40, "micro_batch_size": 2, "global_batch_size": 8,
             "checkpoint_every": 1000, "keep_last": 5, "sample_ledger": True,
             "device": "cpu"}  # this cluster has no GPUs
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, name="term", train=train,
                                 launch={"backend": "slurm", "nproc_per_node": 2})
    config = fixtures.write_config(tmp_path / "term.yaml", cfg)
    assert ftpipe("run", config, "--stages", "shard,tokenize", "--no-progress") == 0  # no data jobs needed
    (job,) = submit(load_config(config), ["train"], Path.cwd())  # the train job alone: nothing after it
    run = RunDir(tmp_path / "runs" / "term")
    metrics = run.root / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert time.monotonic() < deadline, status_lines(run)
        time.sleep(0.1)
    subprocess.run(["scancel", job.job_id], env=slurm_cluster.env, check=True)
    lines = wait_for(run, timeout=120)
    log = Path(job.stderr).read_text()
    assert "stopped on SIGTERM at step" in log and "not requeued" in log, "\n".join(lines) + log[-3000:]
    assert json.loads((run.slurm_dir / job.job_id / "outcome.json").read_text())["outcome"] == "stopped"
    saved = sorted((run.root / "train" / "checkpoints").glob("step-*/COMPLETE"))
    assert len(saved) == 1, "the stop writes exactly one checkpoint"
    stopped_at = int(saved[0].parent.name.split("-")[1])

    (again,) = submit(load_config(config), ["train"], Path.cwd())
    lines = wait_for(run, timeout=240)
    assert "done" in status_lines(run)[2], "\n".join(lines) + Path(again.stderr).read_text()[-3000:]
    assert manifest(run, "train")["resumed_from_step"] == stopped_at and 5 <= stopped_at < 40
    _assert_each_sample_once(run, steps=40, global_batch=8)


def _assert_each_sample_once(run: RunDir, steps: int, global_batch: int) -> None:
    from pipeline.tokenized import open_split
    from pipeline.train.data import SampleOrder

    table = open_split(run.root / "tokenize" / "train")
    expected = [int(r) for r in SampleOrder(table.num_rows, seed=0).rows(0, steps * global_batch)]
    trained = [r for path in sorted((run.root / "train" / "ledger").glob("rank-*.jsonl"))
               for line in path.read_text().splitlines() for r in json.loads(line)["rows"]]
    assert sorted(trained) == sorted(expected), "a sample was lost or trained twice"


def _wait_for_requeue(slurm_cluster, job_id: str, timeout: float = 120) -> None:
    """Until the job is back in the queue; then let it start now rather than after SLURM's requeue
    hold (BeginTime about two minutes on), which only makes the test slower."""
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_cluster.env,
                               capture_output=True, text=True).stdout
        if "Restarts=1" in shown and "JobState=PENDING" in shown:
            break
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {shown}"
        time.sleep(0.5)
    # slurmd revoked the first run's credential; one made in the same second counts as revoked too
    # ("Killing non-startable batch job: Job credential revoked"), so start it a few seconds on.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], env=slurm_cluster.env,
                   check=True)
