"""`ftpipe submit | status | cancel | logs` and the sbatch templates on a real 1-node SLURM cluster."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from launch.cli import STATUS_ACTIVE, STATUS_FAILED
from launch.slurm_jobs import follow, log_files, read_jobs, status_lines
from pipeline.run_dir import RunDir
from tests import fixtures
from tests.helpers import (
    REPO,
    assert_same_weights,
    file_mode,
    files_holding,
    ftpipe,
    losses,
    manifest,
    weights,
)

STAGES = ("shard", "tokenize", "train", "consolidate", "evaluate")


@pytest.fixture(autouse=True)
def no_jobs_left(slurm_cluster):
    """A failed test must not leave jobs that hold the cluster's CPUs from the tests after it."""
    yield
    slurm_cluster.cancel_all_jobs()


def _config(tmp_path: Path, tiny_llama: Path, text_data: Path, name: str, **launch) -> Path:
    # This cluster has no GPUs: train.device cpu, or the train job would ask for one per rank.
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, name=name, train={"device": "cpu"},
                                 launch={"backend": "slurm", **launch})
    return fixtures.write_config(tmp_path / f"{name}.yaml", cfg)


def wait_for(run_dir: RunDir, timeout: float = 180.0) -> list[str]:
    """Poll until no stage is queued or running; the final status lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = status_lines(run_dir)
        if not any(word in line for line in lines for word in (" queued", " running")):
            return lines
        time.sleep(1)
    raise AssertionError(f"jobs still busy after {timeout}s: {status_lines(run_dir)}")


def squeue_ids(slurm_cluster) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], env=slurm_cluster.env,
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_submit_runs_the_pipeline_like_run(slurm_cluster, tmp_path, tiny_llama, text_data, capsys):
    local = fixtures.write_config(tmp_path / "local.yaml", fixtures.causal_config(
        tmp_path / "local", tiny_llama, text_data))
    assert ftpipe("run", local, "--no-progress") == 0
    config = _config(tmp_path, tiny_llama, text_data, "sub", slurm={"cpu_partition": "cpu"})
    capsys.readouterr()
    assert ftpipe("submit", config) == 0
    out = capsys.readouterr().out
    run = RunDir(tmp_path / "runs" / "sub")
    jobs = read_jobs(run)
    assert [j.stage for j in jobs] == list(STAGES) and out.count("submitted ") == 5
    assert all(j.job_id in out and j.stdout in out for j in jobs)
    lines = wait_for(run)
    assert all(" done " in line for line in lines), "\n".join(lines)
    assert ftpipe("status", run) == 0 and capsys.readouterr().out.count(" done ") == 5
    # The shard array's tasks shared its lock and left it; the shard job took it over once SLURM
    # said the array had ended, and the last job let go of it.
    shard = jobs[0]
    assert f"taking over the lock of SLURM job {shard.array_job_id} " in Path(shard.stderr).read_text()
    assert not run.lock_file.exists()
    assert losses(run) == losses(tmp_path / "local" / "runs" / "lm")
    assert_same_weights(weights(run), weights(tmp_path / "local" / "runs" / "lm"))
    assert manifest(run, "evaluate")["metrics"] == (
        manifest(tmp_path / "local" / "runs" / "lm", "evaluate")["metrics"])
    partitions = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%j %P"], env=slurm_cluster.env,
                                capture_output=True, text=True).stdout
    assert "ftpipe-sub-train debug" in partitions and "ftpipe-sub-shard cpu" in partitions

    before = squeue_ids(slurm_cluster)
    assert ftpipe("submit", config) == 0
    assert "nothing submitted" in capsys.readouterr().out
    assert squeue_ids(slurm_cluster) == before and read_jobs(run) == jobs

    # --force reaches the job (which plans again on its own): train is redone from scratch, once
    trained = manifest(run, "train")["run_id"]
    assert ftpipe("submit", config, "--force", "train", "--stages", "train") == 0
    again = next(j for j in read_jobs(run) if j.stage == "train")
    assert again.job_id != next(j for j in jobs if j.stage == "train").job_id
    assert " done " in wait_for(run)[2]
    assert manifest(run, "train")["run_id"] != trained and manifest(run, "train")["resumed_from_step"] is None


def test_dry_run_writes_scripts_and_quotes_values(slurm_cluster, tmp_path, tiny_llama, text_data, capsys):
    pwned = tmp_path / "pwned"
    evil = f"debug; touch {pwned}"
    config = _config(tmp_path, tiny_llama, text_data, "dry", nnodes=1,
                     slurm={"partition": evil, "account": f"$(touch {pwned})", "setup": ["echo from-setup"]})
    before = squeue_ids(slurm_cluster)
    assert ftpipe("submit", config, "--dry-run") == 0
    scripts = sorted((tmp_path / "runs" / "dry" / "slurm" / "dry-run").glob("*.sbatch"))
    names = ["shard-array", "shard", "tokenize-array", "tokenize", "train", "consolidate", "evaluate"]
    assert [p.name for p in scripts] == [f"{i:02d}-{s}.sbatch" for i, s in enumerate(names)]
    train = scripts[4].read_text()
    array = scripts[2].read_text()  # tokenize: 2 splits x 2 shards x 1 source = 4 pieces, one task each
    assert "#SBATCH --array=0-3%4" in array and "launch.slurm run-array-task" in array
    assert f"#SBATCH --partition='{evil}'" in train and f"#SBATCH --account='$(touch {pwned})'" in train
    assert "sbatch --dependency=afterok:<job id of 03-tokenize> 04-train.sbatch" in train
    assert "echo from-setup" in train and "launch.slurm run-stage" in train
    assert squeue_ids(slurm_cluster) == before and not read_jobs(RunDir(tmp_path / "runs" / "dry"))
    capsys.readouterr()
    assert ftpipe("submit", config) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ftpipe: error: sbatch refused the shard job") and "partition" in err.lower()
    assert not pwned.exists() and squeue_ids(slurm_cluster) == before


def test_status_logs_cancel_on_a_real_job(slurm_cluster, tmp_path, tiny_llama, text_data, capsys):
    config = _config(tmp_path, tiny_llama, text_data, "held",
                     slurm={"setup": ["echo setup-ran", "sleep 120"]})
    assert ftpipe("submit", config) == 0
    run = RunDir(tmp_path / "runs" / "held")
    jobs = {j.stage: j for j in read_jobs(run)}
    deadline = time.monotonic() + 30
    while "running" not in status_lines(run)[0] and time.monotonic() < deadline:
        time.sleep(0.5)
    capsys.readouterr()
    assert ftpipe("status", run) == STATUS_ACTIVE
    status = capsys.readouterr().out.splitlines()
    assert "running (array tasks)" in status[0] and f"job {jobs['shard'].job_id} (array " in status[0]
    assert "queued" in status[1] and jobs["tokenize"].job_id in status[1]
    deadline = time.monotonic() + 10
    while (not any("setup-ran" in p.read_text() for p in log_files(run, "shard"))
           and time.monotonic() < deadline):
        time.sleep(0.5)
    assert ftpipe("logs", run, "shard") == 0
    assert "setup-ran" in capsys.readouterr().out
    assert ftpipe("submit", config) == 2  # a second submit while jobs wait would run stages twice
    assert "still queued or running" in capsys.readouterr().err
    followed: list[str] = []
    follower = threading.Thread(target=follow, args=(run, "shard", followed.append, 0.2))
    follower.start()
    time.sleep(1)
    assert follower.is_alive(), "follows while the job runs"
    assert ftpipe("cancel", run) == 0
    follower.join(timeout=30)
    assert not follower.is_alive() and "setup-ran" in "".join(followed), "and stops when it ends"
    assert capsys.readouterr().out.count("cancelled ") == 5
    lines = wait_for(run, timeout=30)
    assert all("cancelled" in line for line in lines), lines
    assert ftpipe("cancel", run) == 0 and "no queued or running jobs" in capsys.readouterr().out


def test_hand_written_sbatch_templates(slurm_cluster, tmp_path, tiny_llama, text_data):
    config = _config(tmp_path, tiny_llama, text_data, "hand")
    env = {**slurm_cluster.env, "PYTHONPATH": str(REPO)}
    first = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/cpu.out",
                            str(REPO / "slurm/pipeline.sbatch"), str(config)],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    train = subprocess.run(["sbatch", "--parsable", f"--dependency=afterok:{first.stdout.strip()}",
                            f"--output={tmp_path}/train.out", str(REPO / "slurm/train.sbatch"), str(config)],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    job = train.stdout.strip()
    deadline = time.monotonic() + 150
    while job in squeue_ids_active(slurm_cluster) and time.monotonic() < deadline:
        time.sleep(1)
    run = RunDir(tmp_path / "runs" / "hand")
    log = (tmp_path / "train.out").read_text() if (tmp_path / "train.out").exists() else ""
    assert manifest(run, "train")["steps"] == 6, log + (tmp_path / "cpu.out").read_text()
    assert json.loads((run.root / "train" / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0


def squeue_ids_active(slurm_cluster) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_cluster.env, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_multi_node_rendezvous_uses_the_first_expanded_host(slurm_cluster, tmp_path, tiny_llama, text_data,
                                                            monkeypatch):
    from launch.slurm_rendezvous import slurm_rendezvous
    from launch.torchrun import torchrun_command
    from pipeline.config import load_config
    from pipeline.errors import UserError

    cfg = load_config(_config(tmp_path, tiny_llama, text_data, "multi", nnodes=2, nproc_per_node=2),
                      ["train.strategy=ddp"])
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-[07-08]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    launch = slurm_rendezvous(cfg, node=1)
    assert (launch.node_rank, launch.rdzv_endpoint) == (1, "gpu-07:29634")
    cmd = torchrun_command(launch, cfg.name, ["RUN", "train"])
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--rdzv-endpoint=gpu-07:29634" in cmd
    monkeypatch.setenv("SLURM_JOB_NODELIST", slurm_cluster.node)  # a known node: its NodeAddr
    assert slurm_rendezvous(cfg, node=0).rdzv_endpoint == "127.0.0.1:29634"
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    with pytest.raises(UserError, match="3 nodes but launch.nnodes is 2"):
        slurm_rendezvous(cfg, node=0)


def test_status_shows_a_failed_stage_and_its_waiting_dependents(slurm_cluster, tmp_path, tiny_llama,
                                                                text_data, capsys):
    config = _config(tmp_path, tiny_llama, text_data, "broken", slurm={"setup": ["sleep 3"]})
    assert ftpipe("submit", config) == 0
    text_data.unlink()  # after submit checked the paths: the shard job itself fails
    run = RunDir(tmp_path / "runs" / "broken")
    deadline = time.monotonic() + 60
    while "failed" not in status_lines(run)[0] and time.monotonic() < deadline:
        time.sleep(1)
    lines = status_lines(run)
    assert "failed" in lines[0] and all("blocked (shard did not finish)" in line for line in lines[1:]), lines
    assert ftpipe("status", run) == STATUS_FAILED
    capsys.readouterr()
    assert ftpipe("logs", run, "shard") == 0
    assert "text.jsonl" in capsys.readouterr().out  # the job's error names the missing file
    # shard's own job waits on its failed array too: all five are still queued
    assert ftpipe("cancel", run) == 0 and capsys.readouterr().out.count("cancelled ") == 5


def test_a_killed_shard_array_task_is_resubmitted_alone(slurm_cluster, tmp_path, tiny_llama):
    """shard runs as a job array, one task per source file here; cancelling one task midway leaves
    the others' pieces done, and the next submit's array holds only the missing one. Only shard is
    submitted (`--stages shard`): the later stages' jobs have tests of their own."""
    texts = fixtures.sentences(240, seed=3)
    files = [fixtures.write_jsonl(tmp_path / "data" / f"part{i}.jsonl", [{"text": t} for t in texts[i::4]])
             for i in range(4)]
    hold = tmp_path / "hold-task-2"
    hold.touch()
    stall = f'if [ "${{SLURM_ARRAY_TASK_ID:-}}" = 2 ] && [ -e {hold} ]; then sleep 300; fi'
    cfg = fixtures.causal_config(tmp_path, tiny_llama, files[0], name="arr",
                                 data={"train": [str(f) for f in files]},
                                 launch={"backend": "slurm", "slurm": {"setup": [stall]}})
    config = fixtures.write_config(tmp_path / "arr.yaml", cfg)
    assert ftpipe("submit", config, "--stages", "shard") == 0
    run = RunDir(tmp_path / "runs" / "arr")
    shard = next(j for j in read_jobs(run) if j.stage == "shard")
    markers = [run.stage("shard") / "parts" / f"{i:05d}" / "done.json" for i in (0, 1, 3)]
    deadline = time.monotonic() + 120
    while not all(m.is_file() for m in markers):
        assert time.monotonic() < deadline, status_lines(run)
        time.sleep(0.5)
    subprocess.run(["scancel", f"{shard.array_job_id}_2"], env=slurm_cluster.env, check=True)
    deadline = time.monotonic() + 60
    while "cancelled (an array task)" not in status_lines(run)[0]:
        assert time.monotonic() < deadline, status_lines(run)
        time.sleep(0.5)
    assert not (run.root / "shard" / "parts" / "00002" / "done.json").exists()
    before = [m.stat().st_mtime_ns for m in markers]

    hold.unlink()
    assert ftpipe("cancel", run) == 0 and ftpipe("submit", config, "--stages", "shard") == 0
    assert [j.stage for j in read_jobs(run)] == ["shard"]
    again = read_jobs(run)[0]
    lines = wait_for(run, timeout=240)
    assert " done " in lines[0], "\n".join(lines)
    tasks = subprocess.run(["squeue", "-h", "-t", "all", "-j", again.array_job_id, "-o", "%i"],
                           env=slurm_cluster.env, capture_output=True, text=True).stdout.split()
    assert len(tasks) == 1, tasks  # one task: the missing source file only
    assert [m.stat().st_mtime_ns for m in markers] == before, "finished pieces were redone"
    assert (manifest(run, "shard")["splits"]["train"]["rows"]
            + manifest(run, "shard")["splits"]["eval"]["rows"] == 240)


def test_a_sweep_shares_one_dataset_and_one_mlflow_parent(slurm_cluster, tmp_path, tiny_llama, text_data,
                                                          mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    # A password in the URI: the jobs get it from each run's owner-only credentials file.
    password = "pw-31b7d2"
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, name="sw", launch={"backend": "slurm"},
                                 train={"device": "cpu"},
                                 tracking={"enabled": True, "experiment": "sweep", "report": True,
                                           "mlflow_uri": mlflow_server.replace("//", f"//u:{password}@")})
    config = fixtures.write_config(tmp_path / "sw.yaml", cfg)
    assert ftpipe("submit", config, "--sweep", "data.max_seq_len=16,32") == 2
    assert "changes the data" in capsys.readouterr().err
    assert ftpipe("submit", config, "--sweep", "train.lr=1e-3,3e-3") == 0
    base, names = RunDir(tmp_path / "runs" / "sw"), ["sw-lr1e-3", "sw-lr3e-3"]
    out = capsys.readouterr().out
    assert all(f"member {n}: train.lr=" in out for n in names) and "sweep summary job" in out
    deadline = time.monotonic() + 400
    while not (base.sweep_dir / "summary.json").is_file():
        assert time.monotonic() < deadline, [status_lines(RunDir(tmp_path / "runs" / n)) for n in names]
        time.sleep(1)
    rows = json.loads((base.sweep_dir / "summary.json").read_text())
    assert ([r["name"] for r in rows] == names
            and all(r["state"] == "done" and "loss" in r["metrics"] for r in rows))
    assert [j.stage for j in read_jobs(base)] == ["shard", "tokenize"], "the data is prepared once"
    assert (base.sweep_dir / "sweep.png").is_file() and (base.root / "report" / "report.html").is_file()
    for name, lr in zip(names, (1e-3, 3e-3)):
        member = RunDir(tmp_path / "runs" / name)
        assert member.stage("shard").is_symlink() and member.stage("tokenize").is_symlink()
        assert [j.stage for j in read_jobs(member)] == ["train", "consolidate", "evaluate"]
        assert manifest(member, "train")["steps"] == 6 and f"lr: {lr}" in member.config_file.read_text()
    assert losses(tmp_path / "runs" / names[0]) != losses(tmp_path / "runs" / names[1])
    assert ftpipe("status", base) == 0
    shown = capsys.readouterr().out
    assert "sweep:" in shown and all(f"| {n} | train.lr=" in shown for n in names)

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id], max_results=100)
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["sw"]
    assert "mlflow.parentRunId" not in parent.data.tags and parent.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/summary.md", "sweep/sweep.png"} <= logged
    for name in names:
        assert by_name[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    stages = [r for r in runs if "ftpipe.stage" in r.data.tags]
    members = {by_name[n].info.run_id for n in names}
    assert sorted(r.data.tags["ftpipe.stage"] for r in stages if r.data.tags["mlflow.parentRunId"]
                  == parent.info.run_id) == ["shard", "tokenize"]
    assert sum(r.data.tags["mlflow.parentRunId"] in members for r in stages) == 6
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1, "one parent for the sweep"
    runs_dir = tmp_path / "runs"
    kept = sorted(f"{n}/tracking/credentials.json" for n in ["sw", *names])
    assert files_holding(runs_dir, password) == kept
    assert password not in capsys.readouterr().err
    job_files = [p for p in (runs_dir / "sw" / "slurm").glob("*/*") if p.is_file()]  # slurm/<job id>/*
    assert job_files and all(file_mode(p) & 0o077 == 0 for p in job_files), "scripts, pickles, logs"
