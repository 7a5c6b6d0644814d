"""evaluate.lm_eval: what `validate` says, unknown task names, the evaluate fingerprint, metric names,
and a task scored on the tiny model without forking."""

from __future__ import annotations

import os
import sys

import pytest

from pipeline import lm_eval_run
from pipeline.config import validate_config
from pipeline.config_lm_eval import LmEvalConfig
from pipeline.digests import DigestCache
from pipeline.errors import UserError
from pipeline.stages import EVALUATE_LATER_KEYS, STAGES
from tests import fixtures
from tests.fixtures import LM_EVAL_TASK as TASK
from tests.fixtures import write_lm_eval_task as write_task
from tests.helpers import ftpipe


def _config(tmp_path, lm_eval: dict | None = None, **sections) -> dict:
    evaluate = {"lm_eval": lm_eval} if lm_eval else {}
    return fixtures.causal_config(tmp_path, tmp_path / "model", tmp_path / "x.jsonl", evaluate=evaluate,
                                  **sections)


def test_validate_without_lm_eval_installed_names_the_key_and_the_extra(tmp_path, model_dir, data_file,
                                                                         monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: find_spec and import fail
    raw = fixtures.causal_config(tmp_path, model_dir, data_file, evaluate={"lm_eval": {"tasks": ["x"]}})
    assert ftpipe("validate", fixtures.write_config(tmp_path / "c.yaml", raw)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "evaluate.lm_eval" in line and "pip install 'ftpipe[eval]'" in line
    del raw["evaluate"]["lm_eval"]
    assert ftpipe("validate", fixtures.write_config(tmp_path / "c.yaml", raw)) == 0


def test_lm_eval_is_refused_for_a_classifier_and_a_missing_include_path(tmp_path):
    cls = fixtures.classification_config(tmp_path, tmp_path, tmp_path / "x.jsonl",
                                         evaluate={"lm_eval": {"tasks": ["x"]}})
    with pytest.raises(UserError, match="evaluate.lm_eval .*model.task causal_lm"):
        validate_config(cls)
    with pytest.raises(UserError, match="evaluate.lm_eval.include_path.*no such file or folder"):
        validate_config(_config(tmp_path, {"tasks": ["x"], "include_path": str(tmp_path / "nope")}))


def test_an_unknown_task_is_one_line_naming_the_key(tmp_path):
    """Only the name lm_eval does not know is named. (The built-in catalogue, read when include_path lacks
    a name, takes lm_eval ~15 s of CPU to index: the check is fed include_path's real index here.)"""
    tasks = write_task(tmp_path / "tasks")
    cfg = validate_config(_config(tmp_path, {"tasks": [TASK], "include_path": str(tasks)}))
    local = lm_eval_run.prepared(cfg.evaluate.lm_eval).manager.all_tasks
    assert local == [TASK]  # all found under include_path: the catalogue was not read
    with pytest.raises(UserError) as err:
        lm_eval_run.check_known([TASK, "no_such_task"], local, str(tasks))
    assert str(err.value) == (f"evaluate.lm_eval.tasks: unknown lm-eval task 'no_such_task' (built in or "
                              f"under {tasks})")


def test_the_fingerprint_covers_the_settings_and_the_task_files_and_not_an_unset_section(tmp_path):
    cache = DigestCache(tmp_path / "digests.json")
    inputs = STAGES["evaluate"].config_inputs
    plain = validate_config(_config(tmp_path))
    before_the_key = plain.evaluate.model_dump(exclude=set(EVALUATE_LATER_KEYS))
    assert inputs(plain, cache) == {"evaluate": before_the_key, "train": {"seed": 0}}  # still up to date
    tasks = write_task(tmp_path / "tasks")
    cfg = validate_config(_config(tmp_path, {"tasks": [TASK], "include_path": str(tasks)}))
    first = inputs(cfg, cache)
    assert first["evaluate"]["lm_eval"]["tasks"] == [TASK]
    assert set(first["lm_eval task files"]) == {f"{TASK}.yaml", "docs.jsonl"}
    cfg.evaluate.lm_eval.num_fewshot = 2
    assert inputs(cfg, cache)["evaluate"] != first["evaluate"]
    (tasks / f"{TASK}.yaml").write_text((tasks / f"{TASK}.yaml").read_text().replace("acc", "acc_norm"))
    assert inputs(cfg, cache)["lm_eval task files"] != first["lm_eval task files"]


def test_metric_names_drop_the_none_filter_and_keep_numbers_only():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict-match": 1,
                     "sample_len": 6}}
    assert lm_eval_run.task_metrics(results) == {"t": {"acc": 0.5, "exact_match_strict-match": 1.0,
                                                       "sample_len": 6.0}}


def test_a_task_is_scored_without_forking_a_process(tmp_path, tiny_llama, monkeypatch):
    """lm_eval's bootstrap standard errors fork a multiprocessing pool unless told not to; a fork from a
    process running torch's and gloo's threads can deadlock the child (it hung a torchrun rank in CI)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def forbidden():
        raise AssertionError("lm_eval forked a process")

    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    settings = LmEvalConfig(tasks=[TASK], include_path=str(write_task(tmp_path / "tasks")))
    harness = lm_eval_run.prepared(settings)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    monkeypatch.setattr(os, "fork", forbidden)
    scores = harness.scores(model, AutoTokenizer.from_pretrained(tiny_llama))
    assert scores[TASK]["sample_len"] == fixtures.LM_EVAL_DOCS and scores[TASK]["perplexity_stderr"] >= 0
