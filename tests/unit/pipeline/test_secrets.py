"""Credentials in the tracking URI and the SLURM setup lines stay out of messages and files."""

import os

from pipeline.config import load_config
from pipeline.run_dir import RunDir
from pipeline.secrets import redact, secret_setup_names
from pipeline.tracking import tracking_uri
from tests import fixtures
from tests.helpers import file_mode, files_holding, free_port, ftpipe

PASSWORD = "pw-5d1e0c"


def test_redact_replaces_userinfo_of_every_uri():
    text = f"API request to http://alice:{PASSWORD}@host:5000/api failed; postgresql://u:{PASSWORD}@db/x"
    assert redact(text) == "API request to http://***@host:5000/api failed; postgresql://***@db/x"
    assert redact("http://host:5000 and sqlite:////tmp/mlflow.db") == "http://host:5000 and sqlite:////tmp/mlflow.db"


def test_secret_setup_names():
    setup = ["module load cuda", "export HF_TOKEN=abc", "WANDB_API_KEY=x python -V", "export PATH=$PATH:/x",
             "source venv/bin/activate; export DB_PASSWORD=y", "export my_secret=z"]
    assert secret_setup_names(setup) == ["DB_PASSWORD", "HF_TOKEN", "WANDB_API_KEY", "my_secret"]


def test_validate_warns_on_setup_lines_that_export_tokens(tmp_path, model_dir, data_file, capsys):
    cfg = fixtures.causal_config(tmp_path, model_dir, data_file, launch={
        "backend": "slurm", "slurm": {"setup": ["module load cuda", "export HF_TOKEN=hf_abc123"]}})
    assert ftpipe("validate", fixtures.write_config(tmp_path / "c.yaml", cfg)) == 0
    err = capsys.readouterr().err
    assert "launch.slurm.setup sets HF_TOKEN" in err and "hf_abc123" not in err


def test_password_in_uri_of_a_dead_server_stays_secret(tmp_path, model_dir, data_file, capsys):
    """The 'not answering' warning quotes MLflow's error, which spells out the URL; the spool and the
    run directory keep only the redacted URI; a later process (a SLURM job) gets the real one back."""
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"
    previous = os.umask(0o022)
    try:
        cfg = fixtures.causal_config(tmp_path, model_dir, data_file,
                                     tracking={"enabled": True, "mlflow_uri": uri})
        assert ftpipe("run", fixtures.write_config(tmp_path / "c.yaml", cfg), "--stages", "shard") == 0
    finally:
        os.umask(previous)
    out, err = capsys.readouterr()
    assert "is not answering" in err and "http://***@127.0.0.1" in err
    assert PASSWORD not in out + err
    run_dir = RunDir(tmp_path / "runs" / "lm")
    assert list(run_dir.spool_dir.glob("*.jsonl"))
    assert files_holding(tmp_path / "runs", PASSWORD) == ["lm/tracking/credentials.json"]
    assert file_mode(run_dir.credentials_file) == 0o600 and file_mode(run_dir.tracking_dir) == 0o700
    assert file_mode(run_dir.root) == 0o750 and file_mode(run_dir.config_file) == 0o600
    assert tracking_uri(load_config(run_dir.config_file), run_dir) == uri
    spooled = sorted(run_dir.spool_dir.iterdir())
    # `ftpipe sync` while the server is still down: one line, nothing lost, no password.
    assert ftpipe("sync", run_dir) == 2
    err = capsys.readouterr().err
    assert "did not answer" in err and "again later" in err and PASSWORD not in err
    assert sorted(run_dir.spool_dir.iterdir()) == spooled
