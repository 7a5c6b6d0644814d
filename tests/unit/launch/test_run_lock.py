"""One writer per run directory (launch/run_lock.py): stale locks, a job's tasks sharing its lock, and
SLURM that cannot be asked. Holders are real processes that take the lock with the real code; the
SLURM commands here are scripts that fail (there is no cluster in these tests: tests/cluster has
one), which is the failure under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.local import write_run_config
from launch.slurm_arrays import ArrayTask
from launch.slurm_jobs import JobRecord, read_jobs, record_jobs
from pipeline.config import load_config
from pipeline.run_dir import RunDir
from pipeline.shard import MARKER
from tests.helpers import REPO, ftpipe

HOLD = """
import os, signal, sys
from pathlib import Path
from launch.run_lock import acquire, this_job
from pipeline.config import load_config
from pipeline.run_dir import RunDir
from pipeline.shard import MARKER
acquire(RunDir(Path(sys.argv[1])), this_job())
print("held", flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


def hold_lock(run_dir: Path, then: str, **env: str) -> subprocess.Popen:
    """A process that takes the lock as a SLURM task would (as itself outside SLURM) and then dies
    without letting go ('die') or holds it until its stdin closes ('wait')."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), then], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True,
                               env={**clean, "PYTHONPATH": str(REPO), **env})
    assert process.stdout.readline() == "held\n"
    return process


@pytest.fixture
def failing_slurm(tmp_path, monkeypatch) -> Path:
    """squeue and sacct that cannot reach SLURM, and an sbatch that leaves a mark if called."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("squeue", "sacct"):
        script = folder / name
        script.write_text(f"#!/bin/sh\necho '{name}: error: Unable to contact slurm controller' >&2\n"
                          "exit 1\n")
        script.chmod(0o755)
    sbatch = folder / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ntouch {folder / 'sbatch-called'}\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    return folder


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_lock_left_by_a_dead_process_is_taken_over(write_cfg, tmp_path, capsys):
    config = write_cfg()
    run = RunDir(tmp_path / "runs" / "demo")
    dead = hold_lock(run.root, "die")
    assert dead.wait() == -9 and json.loads(run.lock_file.read_text())["pid"] == dead.pid
    assert ftpipe("run", config, "--stages", "shard", "--no-progress") == 0
    assert f"taking over the lock of pid {dead.pid} " in capsys.readouterr().err
    assert run.read_manifest("shard") is not None
    assert not run.lock_file.exists(), "the run let go of the lock at its end"


def test_the_tasks_of_one_job_share_its_lock_and_others_are_refused(write_cfg, tmp_path, capsys, monkeypatch,
                                                                    failing_slurm):
    # failing_slurm: job 5150 is made up, so a SLURM that answers (a test cluster started earlier in
    # this process) would rightly call its lock stale; here SLURM cannot be asked, as on a laptop.
    config = write_cfg()
    run = write_run_config(load_config(config))
    task = hold_lock(run.root, "wait", SLURM_ARRAY_JOB_ID="5150", SLURM_JOB_ID="5151")
    try:
        # Another task of array 5150, running at the same time, does its ranks: the same holder. It
        # leaves the lock to its siblings and to the stage's own job.
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "5150")
        monkeypatch.setenv("SLURM_JOB_ID", "5152")
        assert ArrayTask(str(run.root), "shard", str(tmp_path))([0]) == [0]
        assert (run.stage("shard") / "parts" / "00000" / MARKER).is_file()
        assert json.loads(run.lock_file.read_text())["pid"] == task.pid
        # Not a task of the job: refused, naming the job (SLURM cannot say here that it ended).
        for name in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"):
            monkeypatch.delenv(name)
        assert ftpipe("run", config, "--stages", "shard", "--no-progress") == 2
        line = _error_line(capsys)
        assert f"in use by SLURM job 5150 (pid {task.pid} " in line and str(run.lock_file) in line
        assert run.read_manifest("shard") is None
    finally:
        task.stdin.close()
        task.wait()


def test_a_job_holding_the_lock_is_never_assumed_gone_when_slurm_cannot_be_asked(
        write_cfg, tmp_path, capsys, failing_slurm):
    config = write_cfg()
    run = RunDir(tmp_path / "runs" / "demo")
    hold_lock(run.root, "die", SLURM_JOB_ID="777").wait()  # the job's process is gone; is the job?
    assert ftpipe("run", config, "--stages", "shard", "--no-progress") == 2
    line = _error_line(capsys)
    assert "in use by SLURM job 777" in line and "Unable to contact slurm controller" in line
    assert run.lock_file.exists() and run.read_manifest("shard") is None


def test_submit_refuses_when_squeue_and_sacct_cannot_be_asked(write_cfg, tmp_path, capsys, failing_slurm):
    config = write_cfg()
    run = RunDir(tmp_path / "runs" / "demo")
    earlier = JobRecord("shard", "4242", "out", "err")
    record_jobs(run, [earlier])
    assert ftpipe("submit", config, "launch.backend=slurm") == 2
    line = _error_line(capsys)
    assert line.startswith(f"ftpipe: error: {run.root}: not submitting: SLURM cannot be asked about job 4242")
    assert "squeue: error: Unable to contact slurm controller" in line
    assert not (failing_slurm / "sbatch-called").exists() and read_jobs(run) == [earlier]
    assert not run.lock_file.exists()
