"""A run with a password in tracking.mlflow_uri and a token in launch.slurm.setup, tracked by a real
`mlflow server`, then `submit --dry-run`: neither secret reaches a message, an MLflow param, tag or
artifact, or a file of the run directory other than the owner-only ones that need it."""

import os
import stat
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests import fixtures
from tests.helpers import ftpipe

PASSWORD = "pw-7f3a91"
TOKEN = "hf_tok9c2e4b"


def _files_holding(root: Path, secret: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and secret.encode() in p.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _everything_mlflow_holds(client: MlflowClient) -> str:
    texts = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    return "\n".join(texts)


def test_secrets_stay_out_of_logs_params_artifacts_and_scripts(tmp_path, tiny_llama, text_data, mlflow_server,
                                                               capsys):
    server_uri = mlflow_server.replace("http://", f"http://alice:{PASSWORD}@")
    cfg = fixtures.causal_config(
        tmp_path, tiny_llama, text_data, train={"max_steps": 2},
        tracking={"enabled": True, "mlflow_uri": server_uri, "experiment": "secret"},
        launch={"slurm": {"setup": ["module load cuda", f"export HF_TOKEN={TOKEN}"]}})
    config = fixtures.write_config(tmp_path / "lm.yaml", cfg)
    previous = os.umask(0o022)
    try:
        assert ftpipe("run", config, "--no-progress", "--stages", "shard,tokenize,train") == 0
        assert ftpipe("submit", config, "--dry-run", "launch.backend=slurm") == 0
    finally:
        os.umask(previous)
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and TOKEN not in out + err
    assert "launch.slurm.setup sets HF_TOKEN" in err

    client = MlflowClient(tracking_uri=mlflow_server)
    train = client.search_runs([client.get_experiment_by_name("secret").experiment_id],
                               "tags.`ftpipe.stage` = 'train'")[0]
    assert sorted(m.step for m in client.get_metric_history(train.info.run_id, "loss")) == [1, 2]
    held = _everything_mlflow_holds(client)
    assert "tracking.mlflow_uri=http://***@127.0.0.1" in held
    assert PASSWORD not in held and TOKEN not in held
    # The server's database and artifact store (config.yaml, manifests):
    assert (tmp_path / "server.db").is_file() and list((tmp_path / "server-artifacts").rglob("config.yaml"))
    for secret in (PASSWORD, TOKEN):
        assert secret.encode() not in (tmp_path / "server.db").read_bytes()
        assert not _files_holding(tmp_path / "server-artifacts", secret)

    runs = tmp_path / "runs"
    run_dir = runs / "lm"
    assert _files_holding(runs, PASSWORD) == ["lm/tracking/credentials.json"]
    scripts = sorted((run_dir / "slurm" / "dry-run").glob("*.sbatch"))
    assert scripts and not _files_holding(run_dir / "slurm", PASSWORD)
    # The token is the user's batch-script line: only in the config and the scripts, owner-only.
    holding_token = _files_holding(runs, TOKEN)
    assert holding_token == ["lm/config.yaml", *(str(p.relative_to(runs)) for p in scripts)]
    assert all(_mode(runs / name) == 0o600 for name in holding_token)
    assert _mode(run_dir / "tracking" / "credentials.json") == 0o600 and _mode(run_dir) == 0o750
