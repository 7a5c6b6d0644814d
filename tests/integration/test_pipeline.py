"""End to end through the real CLI on tiny real models: both tasks, skipping, re-running, transfer."""

import json
import re

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from launch.cli import STATUS_INCOMPLETE
from tests import fixtures
from tests.helpers import assert_same_weights, ftpipe, losses, manifest, weights

# First losses of the tiny Llama run (seeded init, fixed data order); a change in the loop, the
# data order or the loss normalisation moves them.
EXPECTED_LM_LOSSES = [5.7, 5.6]


@pytest.fixture
def lm_config(tmp_path, tiny_llama, text_data):
    return fixtures.write_config(tmp_path / "lm.yaml",
                                 fixtures.causal_config(tmp_path, tiny_llama, text_data))


@pytest.fixture
def cls_config(tmp_path, tiny_bert, labelled_data):
    cfg = fixtures.classification_config(tmp_path, tiny_bert, labelled_data)
    return fixtures.write_config(tmp_path / "cls.yaml", cfg)


STEP_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train step (\d+)/6 epoch ([\d.]+) loss ([\d.]+) lr \S+ "
    r"grad_norm [\d.]+ tokens/s \d+ mfu [\d.]+% peak_mem [\d.]+[MG] elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d$")


def test_causal_lm_end_to_end(tmp_path, lm_config, capsys):
    assert ftpipe("run", lm_config, "--no-progress") == 0
    run = tmp_path / "runs" / "lm"
    # Without a terminal: a timestamped line per logged step on stdout, and stage start and end lines.
    printed = capsys.readouterr().out
    out = printed.splitlines()
    steps = [m.groups() for line in out if (m := STEP_LINE.match(line))]
    assert [int(s[0]) for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [float(s[2]) for s in steps] == pytest.approx(losses(run), abs=1e-4)
    rows = manifest(run, "tokenize")["splits"]["train"]["rows"]
    assert float(steps[-1][1]) == pytest.approx(manifest(run, "train")["samples"] / rows, abs=0.005)
    for stage in ("shard", "tokenize", "train", "consolidate", "evaluate"):
        assert any(re.match(rf"^\d{{4}}-.* {stage} started \(", line) for line in out), stage
        assert any(re.match(rf"^\d{{4}}-.* {stage} +done in ", line) for line in out), stage
    for stage in ("shard", "tokenize", "train", "consolidate", "evaluate"):
        assert manifest(run, stage)["stage"] == stage
    train = manifest(run, "train")
    assert train["steps"] == 6 and train["tokens_trained"] > 0 and train["tokens_per_second"] > 0
    [peaks] = train["peak_memory"]  # one per rank; no CUDA here: null, the host's peak RSS instead
    assert peaks["rank"] == 0 and peaks["peak_rss_bytes"] > 100 * 2**20
    assert peaks["cuda_max_allocated_bytes"] is None and peaks["cuda_max_reserved_bytes"] is None
    assert losses(run)[:2] == pytest.approx(EXPECTED_LM_LOSSES, abs=0.1)
    assert losses(run)[-1] < losses(run)[0]
    tokenize = manifest(run, "tokenize")["splits"]
    assert tokenize["train"]["rows"] + tokenize["eval"]["rows"] == 120
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert metrics["eval_rows"] == tokenize["eval"]["rows"]
    samples = (run / "evaluate" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and all("generated" in json.loads(s) for s in samples)
    model = AutoModelForCausalLM.from_pretrained(run / "consolidate" / "model")
    assert model.num_parameters() > 0
    assert "perplexity" in printed


def test_classification_end_to_end_learns(tmp_path, cls_config, capsys):
    # data.labels left out: the names are inferred from the training split (sorted) and reach the
    # train, evaluate and consolidate stages and the model's id2label.
    assert ftpipe("run", cls_config, "--no-progress", "train.max_steps=150", "train.lr=1e-3",
                  "train.checkpoint_every=150", "data.labels=null") == 0  # learning, not checkpoints
    run = tmp_path / "runs" / "cls"
    assert manifest(run, "shard")["labels"] == ["negative", "positive"]
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9 > metrics["base"]["accuracy"]
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["eval_examples"]
    model = AutoModelForSequenceClassification.from_pretrained(run / "consolidate" / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "accuracy" in out


def test_rerun_skips_every_stage(tmp_path, lm_config, capsys):
    assert ftpipe("run", lm_config, "--no-progress") == 0
    run = tmp_path / "runs" / "lm"
    first = {s: manifest(run, s)["run_id"] for s in ("shard", "tokenize", "train", "consolidate", "evaluate")}
    capsys.readouterr()
    assert ftpipe("run", lm_config, "--no-progress") == 0
    plan = capsys.readouterr().out
    assert plan.count("skip    up to date") == 5
    assert first == {s: manifest(run, s)["run_id"] for s in first}


def test_a_forced_changed_stage_reruns_with_what_depends_on_it(tmp_path, lm_config, capsys):
    assert ftpipe("run", lm_config, "--no-progress") == 0
    run = tmp_path / "runs" / "lm"
    before = {s: manifest(run, s)["run_id"]
              for s in ("shard", "tokenize", "train", "consolidate", "evaluate")}
    assert ftpipe("run", lm_config, "--no-progress", "train.lr=5e-4") == 2  # finished work is kept
    assert {s: manifest(run, s)["run_id"] for s in before} == before
    assert ftpipe("run", lm_config, "--no-progress", "train.lr=5e-4", "--force", "train") == 0
    after = {s: manifest(run, s)["run_id"] for s in before}
    assert [s for s in before if before[s] == after[s]] == ["shard", "tokenize"]
    assert ftpipe("run", lm_config, "--no-progress", "train.lr=5e-4", "data.max_seq_len=16",
                  "--force", "tokenize") == 0
    again = {s: manifest(run, s)["run_id"] for s in before}
    assert [s for s in before if after[s] == again[s]] == ["shard"]
    assert manifest(run, "tokenize")["splits"]["train"]["max_len"] <= 16


def test_a_data_change_is_refused_until_forced_then_reruns_everything(tmp_path, lm_config, text_data):
    assert ftpipe("run", lm_config, "--no-progress") == 0
    run = tmp_path / "runs" / "lm"
    shard_id = manifest(run, "shard")["run_id"]
    with open(text_data, "a") as handle:
        handle.write(json.dumps({"text": "a brand new row about the river"}) + "\n")
    assert ftpipe("run", lm_config, "--no-progress") == 2
    assert ftpipe("run", lm_config, "--no-progress", "--force", "shard") == 0
    assert manifest(run, "shard")["run_id"] != shard_id


def test_stage_subset_and_force(tmp_path, lm_config, capsys):
    assert ftpipe("run", lm_config, "--no-progress", "--stages", "shard,tokenize") == 0
    run = tmp_path / "runs" / "lm"
    assert not (run / "train" / "manifest.json").exists()
    assert ftpipe("run", lm_config, "--no-progress", "--stages", "train", "train.lr=2e-3") == 0
    assert (run / "train" / "manifest.json").exists() and not (run / "consolidate").exists()
    capsys.readouterr()
    assert ftpipe("run", lm_config, "--no-progress", "--stages", "consolidate") == 2
    assert "train" in capsys.readouterr().err  # lr differs from the trained one: train is stale
    tokenize_id = manifest(run, "tokenize")["run_id"]
    assert ftpipe("run", lm_config, "--no-progress", "--force", "tokenize", "train.lr=2e-3") == 0
    assert manifest(run, "tokenize")["run_id"] != tokenize_id
    assert manifest(run, "evaluate")["inputs"]["consolidate"] == manifest(run, "consolidate")["run_id"]


def test_dry_run_and_validate_write_nothing(tmp_path, lm_config, capsys):
    assert ftpipe("run", lm_config, "--dry-run") == 0
    assert ftpipe("validate", lm_config) == 0
    assert not (tmp_path / "runs" / "lm").exists()
    out = capsys.readouterr().out
    assert out.count("not done yet") == 10


def test_transfer_second_run_starts_from_first_runs_model(tmp_path, lm_config):
    assert ftpipe("run", lm_config, "--no-progress") == 0
    first = tmp_path / "runs" / "lm"
    model_dir = first / "consolidate" / "model"
    second_cfg = fixtures.write_config(tmp_path / "second.yaml", fixtures.causal_config(
        tmp_path, model_dir, fixtures.write_jsonl(tmp_path / "more.jsonl",
                                                  [{"text": s} for s in fixtures.sentences(80, seed=7)]),
        name="lm2"))
    assert ftpipe("run", second_cfg, "--no-progress", "evaluate.compare_base=true") == 0
    second = tmp_path / "runs" / "lm2"
    metrics = json.loads((second / "evaluate" / "metrics.json").read_text())
    assert metrics["loss"] < metrics["base"]["loss"]
    # The second run's starting point is the first run's result, not the original tiny model.
    assert metrics["base"]["loss"] < losses(first)[0] - 0.1


def test_identical_runs_give_identical_weights(tmp_path, tiny_llama, text_data):
    cfgs = [fixtures.write_config(tmp_path / f"{n}.yaml",
                                  fixtures.causal_config(tmp_path, tiny_llama, text_data, name=n))
            for n in ("a", "b")]
    for cfg in cfgs:
        assert ftpipe("run", cfg, "--no-progress") == 0
    assert losses(tmp_path / "runs" / "a") == losses(tmp_path / "runs" / "b")
    assert_same_weights(weights(tmp_path / "runs" / "a"), weights(tmp_path / "runs" / "b"))


def test_bf16_autocast_tracks_fp32_and_a_cpu_without_bf16_trains_in_fp32(tmp_path, tiny_llama, text_data,
                                                                         monkeypatch, capsys):
    # This CPU's flags, as seen by ftpipe: without native bf16 whatever machine runs the test.
    monkeypatch.setattr("pipeline.precision.cpu_flags", lambda: {"avx2"})
    runs = (("fp32", {"precision": "fp32"}), ("bf16", {"precision": "bf16", "allow_slow_bf16": True}),
            ("cpu", {"precision": "bf16"}))
    for name, train in runs:
        cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, name=name, train=train)
        assert ftpipe("run", fixtures.write_config(tmp_path / f"{name}.yaml", cfg), "--no-progress") == 0
    fp32, bf16, cpu = (losses(tmp_path / "runs" / name) for name, _ in runs)
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, abs=0.05)
    assert cpu == fp32 and manifest(tmp_path / "runs" / "cpu", "train")["precision"] == "fp32"
    assert manifest(tmp_path / "runs" / "bf16", "train")["precision"] == "bf16"
    warned = [line for line in capsys.readouterr().err.splitlines() if "no native bf16" in line]
    assert len(warned) == 1 and "x slower than fp32 here" in warned[0] and "allow_slow_bf16" in warned[0]
    # evaluation runs in the precision training ran in, on the training device
    evaluated = {name: manifest(tmp_path / "runs" / name, "evaluate") for name, _ in runs}
    assert [evaluated[n]["dtype"] for n, _ in runs] == ["float32", "bfloat16", "float32"]
    eval_losses = [evaluated[n]["metrics"]["loss"] for n in ("fp32", "bf16")]
    assert eval_losses[1] == pytest.approx(eval_losses[0], abs=0.05)


def test_status_shows_done_and_pending_stages(tmp_path, lm_config, capsys):
    assert ftpipe("run", lm_config, "--no-progress", "--stages", "shard,tokenize") == 0
    capsys.readouterr()
    assert ftpipe("status", tmp_path / "runs" / "lm") == STATUS_INCOMPLETE
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert lines == {"shard": "done", "tokenize": "done", "train": "pending", "consolidate": "pending",
                     "evaluate": "pending"}
    assert ftpipe("status", tmp_path / "nowhere") == 2
