"""Two writers of one run directory: the second stops at once naming the first, which finishes unharmed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from pipeline.run_dir import RunDir
from tests import fixtures
from tests.helpers import REPO, ftpipe, manifest
from tests.processes import kill_tree, output, start_run, wait_for_lines

STAGES = ("shard", "tokenize", "train", "consolidate", "evaluate")


def test_a_second_run_and_a_slurm_stage_job_exit_2_naming_the_running_one(tmp_path, tiny_llama, text_data,
                                                                          capsys):
    config = fixtures.write_config(tmp_path / "lm.yaml", fixtures.causal_config(
        tmp_path, tiny_llama, text_data))
    run = RunDir(tmp_path / "runs" / "lm")
    first = start_run(config)
    try:
        wait_for_lines(run.stage("train") / "metrics.jsonl", 1, first)
        # Paused mid-training, so that it certainly still holds the run while the others try.
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            second = ftpipe("run", config, "--no-progress")
            err = capsys.readouterr().err.strip()
            # The entry point of a SLURM stage job (what `ftpipe submit` and slurm/train.sbatch run),
            # started as srun starts it: in a job, known by SLURM_JOB_ID.
            job = subprocess.run([sys.executable, "-m", "launch.slurm", "run-stage", str(run.root), "train",
                                  "--cwd", str(tmp_path)], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242"})
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            kill_tree(first)
    holder = f"in use by pid {first.pid} on {socket.gethostname()} since "
    assert second == 2 and len(err.splitlines()) == 1 and holder in err, err
    assert job.returncode == 2 and len(job.stderr.strip().splitlines()) == 1, job.stderr
    assert holder in job.stderr
    assert first.returncode == 0, output(first)[-3000:]
    assert all(run.read_manifest(stage) for stage in STAGES)
    assert manifest(run, "train")["steps"] == 6
    assert not run.lock_file.exists()
