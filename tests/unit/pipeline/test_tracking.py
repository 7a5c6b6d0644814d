"""MLflow: a real sqlite store, a real `mlflow server` on 127.0.0.1, and a dead server."""

import socket

from mlflow.tracking import MlflowClient

from pipeline.run_dir import RunDir
from pipeline.tracking import Tracker
from pipeline.tracking_ops import batch
from pipeline.tracking_spool import Spool, read_records, spool_files, spool_size
from tests import fixtures
from tests.helpers import free_port, ftpipe, manifest

STAGES = {"shard", "tokenize", "train", "consolidate", "evaluate"}


def _config(tmp_path, tiny_llama, text_data, **tracking):
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, tracking={"enabled": True, **tracking})
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
    assert [a.path for a in client.list_artifacts(train, "train")] == ["train/manifest.json"]
    assert "perplexity" in children["evaluate"].data.metrics


def test_default_sqlite_store_records_everything(tmp_path, tiny_llama, text_data):
    config = _config(tmp_path, tiny_llama, text_data)
    assert ftpipe("run", config, "--no-progress") == 0
    db = tmp_path / "runs" / "mlflow.db"
    assert db.is_file()
    _check_recorded(f"sqlite:///{db}", "lm")


def test_real_mlflow_server(tmp_path, tiny_llama, text_data, mlflow_server):
    config = _config(tmp_path, tiny_llama, text_data, mlflow_uri=mlflow_server, experiment="served")
    assert ftpipe("run", config, "--no-progress") == 0
    _check_recorded(mlflow_server, "served")


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
