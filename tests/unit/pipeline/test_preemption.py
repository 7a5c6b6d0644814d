"""Stop signals and the time they leave: signal_lead_seconds is checked against a measured step plus
checkpoint. (SIGTERM's coordinated save: tests/integration/test_distributed_resume.py and tests/cluster.)"""

from __future__ import annotations

import pytest

from launch.process import quiet_libraries
from pipeline.preemption import LeadCheck
from tests import fixtures
from tests.helpers import ftpipe


@pytest.fixture(autouse=True)
def ftpipe_log() -> None:
    quiet_libraries()  # ftpipe's warnings go to stderr, as in every entry point


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "signal_lead_seconds" in line]


def test_lead_check_warns_once_when_a_step_plus_a_save_exceeds_the_lead(capsys):
    check = LeadCheck(lead_seconds=10)
    check.step_took(60.0)  # the first step warms up: not counted
    check.step_took(4.0)
    check.save_took(5.0)
    assert _warnings(capsys) == []
    check.step_took(6.0)
    check.save_took(5.0)
    check.step_took(7.0)
    (line,) = _warnings(capsys)
    assert "a step (6.0 s) plus a checkpoint (5.0 s)" in line and "(10 s)" in line and "\n" not in line


def test_lead_check_outside_a_slurm_job_says_nothing(capsys):
    check = LeadCheck(lead_seconds=None)
    check.step_took(1e6)
    check.save_took(1e6)
    assert _warnings(capsys) == []


def test_a_train_job_warns_when_signal_lead_seconds_is_too_short(tmp_path, tiny_llama, text_data, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # as inside a job; the lead is only checked there
    train = {"max_steps": 2, "checkpoint_every": 1}
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, train=train,
                                 launch={"slurm": {"signal_lead_seconds": 0}})
    config = fixtures.write_config(tmp_path / "c.yaml", cfg)
    assert ftpipe("run", config, "--stages", "shard,tokenize,train", "--no-progress") == 0
    (line,) = _warnings(capsys)
    assert line.startswith("ftpipe: train: a step (")
