"""Held-out scoring during training (train.eval_every): logged by step, the best checkpoint kept outside
keep_last's rotation (train.keep_best), and consolidate.checkpoint choosing what becomes the model.
2 ranks against 1 process: test_distributed.py::test_two_ranks_match_the_single_process_run."""

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.plots import read_jsonl
from pipeline.train.checkpoint import complete_checkpoints
from tests import fixtures
from tests.helpers import ftpipe, manifest


def test_held_out_scoring_keeps_the_best_checkpoint_and_consolidate_takes_it(tmp_path, tiny_llama,
                                                                             text_data):
    train = {"max_steps": 6, "eval_every": 2, "keep_best": True, "keep_last": 1, "checkpoint_every": 100}
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, train=train,
                                 consolidate={"checkpoint": "best"}, tracking={"enabled": True})
    assert ftpipe("run", fixtures.write_config(tmp_path / "lm.yaml", cfg), "--no-progress") == 0
    run = tmp_path / "runs" / "lm"
    scored = read_jsonl(run / "train" / "eval.jsonl")
    assert [e["step"] for e in scored] == [2, 4, 6]
    assert all(e["loss"] > 0 and e["perplexity"] > 1 for e in scored)
    best = min(scored, key=lambda e: e["loss"])
    trained = manifest(run, "train")
    assert trained["best_step"] == best["step"] and trained["best_eval_loss"] == best["loss"]
    kept = [p.name for p in complete_checkpoints(run / "train" / "checkpoints")]
    assert kept == sorted({f"step-{best['step']:06d}", "step-000006"}), "the best outlives keep_last 1"
    assert manifest(run, "consolidate")["checkpoint"] == f"train/{trained['best_checkpoint']}"
    # The evaluate stage scores the consolidated (best) model: the same number training logged for it.
    evaluated = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert evaluated["loss"] == pytest.approx(best["loss"], rel=1e-6)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    train_run = next(r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                     if r.data.tags.get("ftpipe.stage") == "train")
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "eval_loss")] == [2, 4, 6]


@pytest.mark.parametrize("train, consolidate, expected", [
    ({"keep_best": True}, {}, "train.keep_best needs train.eval_every"),
    ({"eval_every": 2}, {"checkpoint": "best"}, "consolidate.checkpoint: best needs train.keep_best: true"),
    ({}, {"checkpoint": "step-x"}, "consolidate.checkpoint: String should match pattern"),
])
def test_choices_that_cannot_work_are_one_line_errors(tmp_path, tiny_llama, text_data, capsys, train,
                                                      consolidate, expected):
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, train=train, consolidate=consolidate)
    assert ftpipe("validate", fixtures.write_config(tmp_path / "lm.yaml", cfg)) == 2
    assert expected in capsys.readouterr().err


def test_a_step_that_was_not_kept_is_named_with_the_kept_ones(tmp_path, tiny_llama, text_data, capsys):
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, consolidate={"checkpoint": "step-1"})
    assert ftpipe("run", fixtures.write_config(tmp_path / "lm.yaml", cfg), "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ftpipe: error: consolidate.checkpoint: step-1: ") and "steps 4, 6" in err
