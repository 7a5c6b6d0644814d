"""evaluate on two ranks (torchrun, gloo on CPU) reports the numbers of one process: each rank scores
its share of the held-out batches and the sums are reduced exactly. The stage runs alone on a
tokenized run whose "consolidated model" is the tiny model itself: no training is needed for this."""

from __future__ import annotations

import json
import shutil

import pytest

from launch.local import write_run_config
from launch.torchrun import launch_stage
from pipeline import evaluate, shard, tokenize
from pipeline.config import validate_config
from pipeline.stages import STAGES
from tests import fixtures
from tests.stage_runs import run_stage, stage_context

pytestmark = pytest.mark.multirank

TWO_RANKS = {"launch": {"backend": "torchrun", "nproc_per_node": 2}, "train": {"strategy": "ddp"}}


def _prepared(raw: dict):
    """Shard and tokenize in this process; the config the ranks read in the run directory."""
    cfg = validate_config(raw)
    ctx = stage_context(cfg)
    run_stage(shard, cfg, ctx)
    run_stage(tokenize, cfg, ctx)
    write_run_config(cfg)
    return cfg, ctx


@pytest.fixture(scope="module")
def causal(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("eval-lm")
    data = fixtures.write_jsonl(tmp / "text.jsonl", [{"text": s} for s in fixtures.sentences(120)])
    # An lm-eval task too: rank 0 alone runs it while rank 1 waits, and both ranks return its scores.
    folder = fixtures.write_lm_eval_task(tmp / "tasks")
    tasks = {"tasks": [fixtures.LM_EVAL_TASK], "include_path": str(folder)}
    cfg, ctx = _prepared(fixtures.causal_config(
        tmp, tiny_llama, data, data={"packing": True},
        # Sampled: each batch is seeded by its position, so the ranks sample what one process samples.
        evaluate={"batch_size": 2, "num_generations": 3, "max_rows": 9, "lm_eval": tasks, "temperature": 1.0},
        **TWO_RANKS))
    shutil.copytree(tiny_llama, ctx.run_dir.model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")  # the task's data is a local file; torchrun's ranks inherit
        yield cfg, ctx


@pytest.fixture(scope="module")
def classification(tmp_path_factory, tiny_bert):
    import torch
    from transformers import AutoModelForSequenceClassification

    tmp = tmp_path_factory.mktemp("eval-cls")
    data = fixtures.write_jsonl(tmp / "labelled.jsonl", fixtures.labelled(120))
    cfg, ctx = _prepared(fixtures.classification_config(tmp, tiny_bert, data, evaluate={"batch_size": 4},
                                                        **TWO_RANKS))
    torch.manual_seed(1)  # a head of its own, saved: every rank loads the same model
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    model.save_pretrained(ctx.run_dir.model_dir)
    shutil.copy(tiny_bert / "tokenizer.json", ctx.run_dir.model_dir)
    return cfg, ctx


def _assert_same(two: dict, one: dict) -> None:
    assert two.keys() == one.keys()
    for key, value in one.items():
        if isinstance(value, dict):
            _assert_same(two[key], value)
        elif isinstance(value, float):
            assert two[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert two[key] == value, key  # counts, confusion matrices


@pytest.mark.parametrize("task", ["causal", "classification"])
def test_two_ranks_report_the_one_process_metrics(request, task):
    cfg, ctx = request.getfixturevalue(task)
    alone = evaluate.run(cfg, ctx)  # here, in this process, with no process group
    samples_file = ctx.run_dir.stage("evaluate") / "samples.jsonl"
    samples = samples_file.read_text() if samples_file.is_file() else None
    two = launch_stage(STAGES["evaluate"], cfg, ctx)  # torchrun, as `ftpipe run` starts it
    assert alone["world_size"] == 1 and two["world_size"] == 2
    _assert_same(two["metrics"], alone["metrics"])
    assert json.loads(ctx.run_dir.metrics_file.read_text()) == two["metrics"]  # rank 0 wrote them
    if task == "causal":
        rows = ctx.run_dir.read_manifest("tokenize")["splits"]["eval"]["rows"]
        assert two["metrics"]["eval_rows"] == 9 < rows
        # batch 0 (2 samples) from rank 0, batch 1 (1 sample) from rank 1: the same samples, in order
        assert (ctx.run_dir.stage("evaluate") / "samples.jsonl").read_text() == samples
        assert len(samples.splitlines()) == 3
        assert two["metrics"]["lm_eval"][fixtures.LM_EVAL_TASK]["sample_len"] == fixtures.LM_EVAL_DOCS
    else:
        rows = ctx.run_dir.read_manifest("tokenize")["splits"]["eval"]["rows"]
        assert two["metrics"]["eval_examples"] == two["metrics"]["eval_rows"] == rows
        assert two["metrics"]["base"]["confusion_matrix"] == alone["metrics"]["base"]["confusion_matrix"]
