"""Kill the real CLI with SIGKILL mid-training; rerunning resumes at the exact sample."""

import json

import pytest

from tests import fixtures
from tests.helpers import assert_same_weights, ftpipe, ftpipe_process, losses, manifest, weights

KILL_AFTER_CHECKPOINT = """
import os, signal
import pipeline.train.loop as loop
_save = loop.save_checkpoint
def save_then_die(root, step, *args, **kwargs):
    path = _save(root, step, *args, **kwargs)
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
loop.save_checkpoint = save_then_die
"""

KILL_WHILE_WRITING_CHECKPOINT = """
import os, signal
import pipeline.train.checkpoint as checkpoint
_write = checkpoint.atomic_write_json
def die_mid_checkpoint(path, obj):
    if ".step-000004.partial" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(path, obj)
checkpoint.atomic_write_json = die_mid_checkpoint
"""


def _configs(tmp_path, tiny_bert, labelled_data):
    # BERT has dropout, so an exact resume also needs the RNG state restored.
    extra = {"train": {"max_steps": 8, "checkpoint_every": 2, "keep_last": 3, "micro_batch_size": 8,
                       "grad_accum": 2, "lr": 1e-3}}
    return [fixtures.write_config(tmp_path / f"{n}.yaml", fixtures.classification_config(
        tmp_path, tiny_bert, labelled_data, name=n, **extra)) for n in ("whole", "killed")]


@pytest.mark.parametrize("fault,resume_step",
                         [(KILL_AFTER_CHECKPOINT, 4), (KILL_WHILE_WRITING_CHECKPOINT, 2)])
def test_killed_run_resumes_to_identical_result(tmp_path, tiny_bert, labelled_data, fault, resume_step):
    whole, killed = _configs(tmp_path, tiny_bert, labelled_data)
    assert ftpipe("run", whole, "--no-progress") == 0
    result = ftpipe_process("run", killed, "--no-progress", script=fault)
    assert result.returncode == -9, result.stderr
    run = tmp_path / "runs" / "killed"
    assert not (run / "train" / "manifest.json").exists()
    assert ftpipe("run", killed, "--no-progress") == 0
    assert manifest(run, "train")["resumed_from_step"] == resume_step
    reference = tmp_path / "runs" / "whole"
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6, abs=1e-7)
    assert len(losses(run)) == 8
    assert_same_weights(weights(run), weights(reference), atol=1e-6)
    checkpoints = sorted(p.name for p in (run / "train" / "checkpoints").iterdir())
    assert checkpoints == ["step-000004", "step-000006", "step-000008"]  # keep_last=3, no partials left


def test_resume_skips_finished_stages_and_samples(tmp_path, tiny_bert, labelled_data):
    _, killed = _configs(tmp_path, tiny_bert, labelled_data)
    result = ftpipe_process("run", killed, "--no-progress", script=KILL_AFTER_CHECKPOINT)
    assert result.returncode == -9
    run = tmp_path / "runs" / "killed"
    state = json.loads((run / "train" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["samples"] == 4 * 16  # the data position is a global sample offset
    shard_id = manifest(run, "shard")["run_id"]
    assert ftpipe("run", killed, "--no-progress", "--dry-run") == 0
    assert ftpipe("run", killed, "--no-progress") == 0
    assert manifest(run, "shard")["run_id"] == shard_id
    assert manifest(run, "train")["samples"] == 8 * 16
