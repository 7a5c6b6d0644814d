"""The MLflow server dies in the middle of training (a real `mlflow server` on 127.0.0.1, killed by
PID) and comes back on the same port and store: training completes, and `ftpipe sync` leaves
every step's metrics on the server exactly once, however often it runs."""

import shutil
import time

from mlflow.tracking import MlflowClient

from pipeline.tracking_tags import DEFAULT_EXPERIMENT
from tests import fixtures
from tests.helpers import free_port, ftpipe, manifest
from tests.processes import kill_tree, output, start_mlflow_server, start_run, wait_for_file

STEPS = 4
PAUSE_AT = 2
# Holds training after step PAUSE_AT's metrics went to the tracker until the test says go: the
# server is killed while training is known to be mid-way.
HOLD = """
import pathlib, time
from pipeline import tracking
_log_metrics = tracking.StageRun.log_metrics
def log_metrics(self, metrics, step=None):
    _log_metrics(self, metrics, step)
    if self.name == "train" and step == {pause}:
        pathlib.Path({paused!r}).touch()
        while not pathlib.Path({resume!r}).exists():
            time.sleep(0.05)
tracking.StageRun.log_metrics = log_metrics
"""


def _train_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`ftpipe.stage` = 'train'") if exp else []
    assert len(runs) <= 1, "the train stage run was created more than once"
    return runs[0] if runs else None


def _wait_for_steps(client: MlflowClient, experiment: str, steps: set[int], process) -> None:
    deadline = time.monotonic() + 300
    while True:
        run = _train_run(client, experiment)
        logged = {m.step for m in client.get_metric_history(run.info.run_id, "loss")} if run else set()
        if steps <= logged:
            return
        assert process.poll() is None, output(process)
        assert time.monotonic() < deadline, f"the server never got steps {steps}"
        time.sleep(0.2)


def _metric_steps(client: MlflowClient, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def test_server_outage_mid_training_then_sync(tmp_path, tiny_llama, text_data, capsys):
    store, port = tmp_path / "server", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, train={"max_steps": STEPS},
                                 tracking={"enabled": True, "mlflow_uri": uri})
    config = fixtures.write_config(tmp_path / "lm.yaml", cfg)
    paused, resume = tmp_path / "paused", tmp_path / "resume"
    server = start_mlflow_server(store, port)
    client = MlflowClient(tracking_uri=uri)
    run = start_run(config, "--stages", "shard,tokenize,train",
                    script=HOLD.format(pause=PAUSE_AT, paused=str(paused), resume=str(resume)))
    try:
        wait_for_file(paused, run)
        _wait_for_steps(client, DEFAULT_EXPERIMENT, {1, 2}, run)  # part of the run reaches the server first
        kill_tree(server)
        resume.touch()
        assert run.wait(timeout=600) == 0, output(run)
    finally:
        kill_tree(run)
    log = output(run)
    run_dir = tmp_path / "runs" / "lm"
    assert manifest(run_dir, "train")["steps"] == STEPS
    assert "is not answering" in log and "ftpipe sync" in log, log
    spool = run_dir / "tracking" / "spool"
    kept = tmp_path / "spool-copy"
    shutil.copytree(spool, kept)

    server = start_mlflow_server(store, port)
    try:
        assert ftpipe("sync", run_dir) == 0
        assert not list(spool.glob("*.jsonl")), "sync leaves only *.synced files"
        # A second sync of the same records (as after a sync killed before it renamed its files):
        for path in kept.iterdir():
            shutil.copy(path, spool / path.name)
        assert ftpipe("sync", run_dir) == 0
        train = _train_run(client, DEFAULT_EXPERIMENT)
        for name in ("loss", "lr", "grad_norm"):
            assert _metric_steps(client, train.info.run_id, name) == list(range(1, STEPS + 1)), name
        assert train.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(train.info.run_id, "train")] == ["train/manifest.json"]
        parents = [r for r in client.search_runs([train.info.experiment_id])
                   if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert "sent" in capsys.readouterr().out
    finally:
        kill_tree(server)
