"""No file is trusted unchecked, through the real CLI: a damaged tokenized unit is redone alone, a
broken latest checkpoint is set aside and training resumes from the one before, and a torn metrics
or ledger tail does not block resuming."""

from __future__ import annotations

import json

import pytest

from pipeline.train.checkpoint import MARKER
from tests import fixtures
from tests.helpers import ftpipe, ftpipe_process, losses, manifest

KILL_AFTER_STEP_6 = """
import os, signal
import pipeline.train.loop as loop
_save = loop.save_checkpoint
def save_then_die(root, step, *args, **kwargs):
    path = _save(root, step, *args, **kwargs)
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
loop.save_checkpoint = save_then_die
"""


def test_ftpipe_run_redoes_only_a_damaged_unit(tmp_path, tiny_llama, text_data, capsys):
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data)
    config = fixtures.write_config(tmp_path / "c.yaml", cfg)
    data_stages = ("--stages", "shard,tokenize", "--no-progress")
    assert ftpipe("run", config, *data_stages) == 0
    split = tmp_path / "runs" / "lm" / "tokenize" / "train"
    for damage in ("truncate", "delete"):
        arrow = split / "00001.arrow"
        if damage == "truncate":
            arrow.write_bytes(arrow.read_bytes()[:-100])
        else:
            arrow.unlink()
        capsys.readouterr()
        assert ftpipe("run", config, *data_stages) == 0
        assert str(arrow) in capsys.readouterr().out  # the plan says which file makes it rerun
        tokenized = manifest(tmp_path / "runs" / "lm", "tokenize")
        assert (tokenized["ran_shards"], tokenized["reused_shards"]) == (1, 3)
    assert manifest(tmp_path / "runs" / "lm", "shard")["ran_sources"] == 1  # shard was never redone


def _train_config(tmp_path, tiny_bert, labelled_data):
    extra = {"train": {"max_steps": 8, "checkpoint_every": 2, "keep_last": 3, "micro_batch_size": 8,
                       "grad_accum": 2, "lr": 1e-3, "sample_ledger": True}}
    return fixtures.write_config(tmp_path / "c.yaml", fixtures.classification_config(
        tmp_path, tiny_bert, labelled_data, name="cls", **extra))


def _biggest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fault", ["files differ from COMPLETE", "fails to load"])
def test_a_broken_latest_checkpoint_is_set_aside_and_training_resumes_before_it(
        tmp_path, tiny_bert, labelled_data, capsys, fault):
    config = _train_config(tmp_path, tiny_bert, labelled_data)
    killed = ftpipe_process("run", config, "--no-progress", "--stages", "shard,tokenize,train",
                            script=KILL_AFTER_STEP_6)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "runs" / "cls"
    latest = run / "train" / "checkpoints" / "step-000006"
    weights = _biggest_file(latest)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if fault == "fails to load":  # a COMPLETE of an older ftpipe vouches for no sizes: loading fails
        (latest / MARKER).write_text("step 6\n")
    # A kill mid-append leaves a torn, NUL-padded last line in the metrics file and the ledger.
    for log in (run / "train" / "metrics.jsonl", run / "train" / "ledger" / "rank-0.jsonl"):
        with open(log, "ab") as handle:
            handle.write(b'{"step": 7, "lo' + b"\0" * 64)
    assert ftpipe("run", config, "--no-progress", "--stages", "train") == 0
    err = capsys.readouterr().err
    assert f"{latest} set aside as step-000006.corrupt" in err
    assert manifest(run, "train")["resumed_from_step"] == 4
    assert (run / "train" / "checkpoints" / "step-000006.corrupt").is_dir()
    assert len(losses(run)) == 8
    ledger = (run / "train" / "ledger" / "rank-0.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in ledger] == list(range(1, 9))
