"""MLflow: a real sqlite store, a real `mlflow server` on 127.0.0.1, and a dead server."""

from mlflow.tracking import MlflowClient

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
