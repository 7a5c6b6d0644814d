"""MLflow: a real sqlite store, a real `mlflow server` on 127.0.0.1, and a dead server."""

import json
import os
import socket
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

import pipeline
from launch.slurm import parent_run
from pipeline.config import load_config
from pipeline.run_dir import RunDir
from pipeline.tracking import Tracker
from pipeline.tracking_ops import batch
from pipeline.tracking_spool import Spool, read_records, spool_files, spool_size
from pipeline.tracking_tags import DEFAULT_EXPERIMENT
from tests import fixtures
from tests.helpers import file_mode, files_holding, free_port, ftpipe, manifest

STAGES = {"shard", "tokenize", "train", "consolidate", "evaluate"}
PASSWORD = "pw-7f3a91"
TOKEN = "hf_tok9c2e4b"


def _config(tmp_path, tiny_llama, text_data, launch=None, **tracking):
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, tracking={"enabled": True, **tracking},
                                 **({"launch": launch} if launch else {}))
    return fixtures.write_config(tmp_path / "lm.yaml", cfg)


def _check_recorded(uri: str, experiment: str) -> None:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.lr"] == "0.001" and parent.data.params["model.task"] == "causal_lm"
    assert "eval_perplexity" in parent.data.metrics
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["config.yaml"]
    children = {r.data.tags["ftpipe.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == STAGES
    train = children["train"].info.run_id
    history = client.get_metric_history(train, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    memory = {k for k in children["train"].data.metrics if k.startswith("memory/")}
    assert memory == {"memory/rank0/peak_rss_bytes"}  # the CUDA peaks are null here: not logged
    assert [a.path for a in client.list_artifacts(train, "train")] == ["train/manifest.json"]
    evaluation = children["evaluate"]
    assert "perplexity" in evaluation.data.metrics
    _check_samples_and_card(client, evaluation)


def _check_samples_and_card(client: MlflowClient, evaluation) -> None:
    """samples.jsonl as a table MLflow loads back, and the model card with its metrics."""
    import pandas as pd

    run_id = evaluation.info.run_id
    assert json.loads(evaluation.data.tags["mlflow.loggedArtifacts"]) == [{"path": "samples.json",
                                                                           "type": "table"}]
    # Read back as MlflowClient.load_table reads a table (its search goes through the global store).
    table = pd.read_json(client.download_artifacts(run_id, "samples.json"), orient="split")
    assert list(table.columns) == ["prompt", "reference", "generated"] and len(table) == 2
    card = Path(client.download_artifacts(run_id, "model/README.md"))
    assert "| perplexity |" in card.read_text()


def test_default_sqlite_store_records_everything(tmp_path, tiny_llama, text_data):
    config = _config(tmp_path, tiny_llama, text_data)
    assert ftpipe("run", config, "--no-progress") == 0
    db = tmp_path / "runs" / "mlflow.db"
    assert db.is_file()
    _check_recorded(f"sqlite:///{db}", DEFAULT_EXPERIMENT)


def test_mlflow_variables_tags_and_system_metrics(tmp_path, tiny_llama, text_data, monkeypatch):
    """MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID and MLFLOW_TAGS as the HF Trainer reads them; the version,
    git commit, host and layout tags; the train stage's system metrics under MLflow's names."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(tracking_uri=uri)
    outer = client.create_run(client.create_experiment("team")).info.run_id  # e.g. a notebook's run
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["init", "-q"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                                     "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *command], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    head = head.strip()
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    monkeypatch.setenv("MLFLOW_TAGS", '{"release": "rc1"}')
    assert ftpipe("run", _config(tmp_path, tiny_llama, text_data), "--no-progress", "--stages",
                  "shard,tokenize,train") == 0
    runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == outer)
    tags = parent.data.tags
    assert tags["release"] == "rc1" and tags["mlflow.source.git.commit"] == head
    assert tags["ftpipe.version"] == pipeline.__version__ and tags["ftpipe.git_dirty"] == "false"
    assert tags["ftpipe.host"] == socket.gethostname() and tags["ftpipe.world_size"] == "1"
    assert tags["ftpipe.strategy"] == "single"
    train = next(r for r in runs if r.data.tags.get("ftpipe.stage") == "train")
    assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id
    system = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    assert system <= set(train.data.metrics)
    monkeypatch.setenv("MLFLOW_TAGS", "[1, 2]")
    assert ftpipe("validate", _config(tmp_path, tiny_llama, text_data)) == 0, "validate does not track"
    assert ftpipe("run", _config(tmp_path, tiny_llama, text_data), "--no-progress") == 2


def test_real_mlflow_server_with_secrets_set(tmp_path, tiny_llama, text_data, mlflow_server, capsys):
    """A password in the URI and a token in the SLURM setup lines: the run is tracked (with the
    password), then `submit --dry-run` and what `submit` does before sbatch (the parent run in
    slurm/mlflow.json). Neither secret reaches a message, an MLflow param, tag or artifact, the server's
    store, or a file of the run directory other than the owner-only ones that need it."""
    config = _config(tmp_path, tiny_llama, text_data, experiment="served",
                     mlflow_uri=mlflow_server.replace("http://", f"http://alice:{PASSWORD}@"),
                     launch={"slurm": {"setup": ["module load cuda", f"export HF_TOKEN={TOKEN}"]}})
    previous = os.umask(0o022)
    try:
        assert ftpipe("run", config, "--no-progress") == 0
        _check_recorded(mlflow_server, "served")
        assert ftpipe("submit", config, "--dry-run", "--force", "train", "launch.backend=slurm") == 0
        assert parent_run(load_config(config))
    finally:
        os.umask(previous)
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and TOKEN not in out + err
    assert "launch.slurm.setup sets HF_TOKEN" in err
    _check_secrets_kept(tmp_path, MlflowClient(tracking_uri=mlflow_server))


def _check_secrets_kept(tmp_path, client: MlflowClient) -> None:
    held = "\n".join(f"{k}={v}" for exp in client.search_experiments() for run in client.search_runs(
        [exp.experiment_id]) for k, v in {**run.data.params, **run.data.tags}.items())
    assert "tracking.mlflow_uri=http://***@127.0.0.1" in held and "launch.slurm.setup=(2 lines" in held
    assert list((tmp_path / "server-artifacts").rglob("config.yaml"))
    for secret in (PASSWORD, TOKEN):
        assert secret not in held and secret.encode() not in (tmp_path / "server.db").read_bytes()
        assert not files_holding(tmp_path / "server-artifacts", secret)
    runs = tmp_path / "runs"
    run_dir = runs / "lm"
    assert files_holding(runs, PASSWORD) == ["lm/tracking/credentials.json"]
    assert json.loads((run_dir / "slurm" / "mlflow.json").read_text())["uri"].startswith("http://***@")
    scripts = sorted((run_dir / "slurm" / "dry-run").glob("*.sbatch"))
    # The token is the user's batch-script line: only in the config and the scripts, owner-only.
    holding_token = files_holding(runs, TOKEN)
    assert scripts and holding_token == ["lm/config.yaml", *(str(p.relative_to(runs)) for p in scripts)]
    assert all(file_mode(runs / name) == 0o600 for name in holding_token)
    assert file_mode(run_dir / "tracking" / "credentials.json") == 0o600 and file_mode(run_dir) == 0o750


def test_unreachable_tracking_server_does_not_stop_training(tmp_path, tiny_llama, text_data, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    config = _config(tmp_path, tiny_llama, text_data, mlflow_uri=f"http://127.0.0.1:{free_port()}")
    assert ftpipe("run", config, "--no-progress") == 0
    run = tmp_path / "runs" / "lm"
    assert manifest(run, "train")["steps"] == 6 and manifest(run, "evaluate")["metrics"]["loss"] > 0
    assert "is not answering" in capsys.readouterr().err


def test_environment_variable_chooses_the_store(tmp_path, tiny_llama, text_data, monkeypatch):
    db = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    config = _config(tmp_path, tiny_llama, text_data)
    assert ftpipe("run", config, "--no-progress", "--stages", "shard") == 0
    assert db.is_file() and not (tmp_path / "runs" / "mlflow.db").exists()


def test_a_server_that_never_answers_costs_a_bounded_wait_and_loses_nothing(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (the request would hang for the whole
    HTTP timeout): close() gives up after EXIT_STALL_S and spools the call in flight and the queue."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        run_dir = RunDir(tmp_path / "run")
        tracker = Tracker(f"http://127.0.0.1:{silent.getsockname()[1]}", "exp", "run", run_dir)
        tracker.start({"train": {"lr": 0.1}}, {})
        stage = tracker.stage("train", {"action": "run"})
        stage.log_metrics({"loss": 1.5}, step=1)
        assert tracker.close("FINISHED") is False
    records = [r for path in spool_files(run_dir.spool_dir) for r in read_records(path)]
    assert [r["op"] for r in records] == ["create_run", "batch", "artifact", "create_run", "batch", "batch",
                                          "terminate"]
    assert records[5]["metrics"][0][:2] == ["loss", 1.5] and records[5]["key"] == stage.key


def test_spool_is_bounded(tmp_path, capsys):
    from launch.process import quiet_libraries

    quiet_libraries()
    spool = Spool(tmp_path / "spool", limit=1000)
    for step in range(100):
        spool.add(batch("k", {"loss": 1.0}, step))
    assert 0 < spool_size(tmp_path / "spool") <= 1000 and spool.dropped == 100 - spool.records
    assert capsys.readouterr().err.count("is full (1000 bytes)") == 1
