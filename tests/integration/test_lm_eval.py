"""evaluate.lm_eval: an lm-evaluation-harness task of the test's own (a local JSON file, no hub) scored on
the consolidated tiny Llama and on its base model, into metrics.json and a real MLflow sqlite store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from launch.local import print_summary
from pipeline.config import validate_config
from tests import fixtures
from tests.fixtures import LM_EVAL_DOCS as DOCS
from tests.fixtures import LM_EVAL_TASK as TASK
from tests.fixtures import write_lm_eval_task
from tests.helpers import ftpipe


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama, offline) -> tuple[Path, Path, str]:
    """One run, every stage, with the task before and after fine-tuning: (run dir, tasks, store URI)."""
    tmp = tmp_path_factory.mktemp("lm-eval")
    tasks = write_lm_eval_task(tmp / "tasks")
    data = fixtures.write_jsonl(tmp / "text.jsonl", [{"text": s} for s in fixtures.sentences(60)])
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = fixtures.causal_config(
        tmp, tiny_llama, data, train={"max_steps": 4, "lr": 3e-3},
        evaluate={"compare_base": True, "num_generations": 0,
                  "lm_eval": {"tasks": [TASK], "include_path": str(tasks), "batch_size": 4}},
        tracking={"enabled": True, "report": False, "mlflow_uri": store})
    assert ftpipe("run", fixtures.write_config(tmp / "lm.yaml", cfg), "--no-progress") == 0
    return tmp / "runs" / "lm", tasks, store


def harness_alone(model_dir: Path, tasks: Path) -> dict:
    """The same task run by lm_eval itself on a model folder, as a user would outside ftpipe."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    output = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=manager, bootstrap_iters=0)
    return output["results"][TASK]


def test_task_scores_after_and_before_fine_tuning_match_lm_eval_run_alone(finished, tiny_llama):
    run, tasks, _ = finished
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    after, before = metrics["lm_eval"][TASK], metrics["base"]["lm_eval"][TASK]
    assert set(after) >= {"perplexity", "acc", "sample_len"} and after["sample_len"] == DOCS
    assert after["perplexity"] < before["perplexity"]  # fine-tuned on text like the task's
    assert after["perplexity"] == pytest.approx(harness_alone(run / "consolidate" / "model", tasks)
                                                ["perplexity,none"], rel=1e-5)
    assert before["perplexity"] == pytest.approx(harness_alone(tiny_llama, tasks)["perplexity,none"],
                                                 rel=1e-5)


def test_the_summary_after_a_run_shows_each_task_metric_before_and_after(finished):
    run, _, _ = finished
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    out = io.StringIO()
    print_summary(validate_config(yaml.safe_load((run / "config.yaml").read_text())), out)
    before, after = metrics["base"]["lm_eval"][TASK]["acc"], metrics["lm_eval"][TASK]["acc"]
    assert f"  lm_eval {TASK} acc: {before:.4g} -> {after:.4g}\n" in out.getvalue()


def test_task_scores_are_the_evaluate_runs_mlflow_metrics(finished):
    run, _, store = finished
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [evaluate] = client.search_runs(experiments, "tags.`ftpipe.stage` = 'evaluate'")
    logged = evaluate.data.metrics
    assert logged[f"lm_eval_{TASK}_perplexity"] == pytest.approx(metrics["lm_eval"][TASK]["perplexity"])
    assert logged[f"base_lm_eval_{TASK}_acc"] == pytest.approx(metrics["base"]["lm_eval"][TASK]["acc"])
