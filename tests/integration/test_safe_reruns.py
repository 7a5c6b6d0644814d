"""A rerun never deletes finished or resumable work unless the user names the stage: extending training
continues it, any other change stops with the changed keys, a code change alone is only a warning, and
a sweep member never writes through its links into the base run."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from launch.sweep import link_shared_data
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.run_dir import RunDir
from pipeline.runner import plan
from pipeline.stages import STAGES
from tests import fixtures
from tests.helpers import ftpipe, losses, manifest

TRAIN = {"max_steps": 4, "checkpoint_every": 2, "keep_last": 5, "micro_batch_size": 4, "grad_accum": 1}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama) -> Path:
    """A finished run (4 steps, checkpoints at 2 and 4); tests that change it work on a copy."""
    tmp = tmp_path_factory.mktemp("safe")
    data = fixtures.write_jsonl(tmp / "text.jsonl", [{"text": s} for s in fixtures.sentences(80)])
    cfg = fixtures.causal_config(tmp, tiny_llama, data, train=TRAIN, evaluate={"num_generations": 0})
    config = fixtures.write_config(tmp / "lm.yaml", cfg)
    assert ftpipe("run", config, "--no-progress") == 0
    return config


def _copy(config: Path, tmp_path: Path) -> Path:
    """The finished run under another output_dir: same data, model and config otherwise."""
    shutil.copytree(config.parent / "runs", tmp_path / "runs")
    for path in (tmp_path / "lm.yaml", tmp_path / "runs" / "lm" / "config.yaml"):
        source = config if path.name == "lm.yaml" else path
        path.write_text(source.read_text().replace(str(config.parent / "runs"), str(tmp_path / "runs")))
    return tmp_path / "lm.yaml"


def _snapshot(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", [("run",), ("run", "--dry-run"), ("validate",)])
def test_any_other_change_stops_naming_the_keys_and_keeps_every_file(finished, command, capsys):
    run = finished.parent / "runs" / "lm"
    before = _snapshot(run)
    capsys.readouterr()
    assert ftpipe(*command, finished, "train.lr=2e-3", "train.seed=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftpipe: error: train: ")
    assert "train.lr: 0.001 -> 0.002" in err[0] and "train.seed: 0 -> 1" in err[0]
    assert "--force train (deletes" in err[0] and "new `name`" in err[0]
    assert _snapshot(run) == before


def test_a_changed_model_file_names_it(finished, tmp_path):
    config = _copy(finished, tmp_path)
    cfg = load_config(config)
    model = tmp_path / "model"
    shutil.copytree(cfg.model.name_or_path, model)
    (model / "generation_config.json").write_text('{"do_sample": true}')
    changed = r"tokenize: tokenizer files\.generation_config\.json: \w+ -> \w+ since it finished"
    with pytest.raises(UserError, match=changed):
        plan(load_config(config, [f"model.name_or_path={model}"]))


def test_checkpoints_of_an_unfinished_run_are_kept_too(finished, tmp_path):
    config = _copy(finished, tmp_path)
    run = RunDir(tmp_path / "runs" / "lm")
    for name in ("train", "consolidate", "evaluate"):
        run.manifest_path(name).unlink()  # as if stopped after step 4's checkpoint
    kept = r"train: train\.lr: .* since train/checkpoints/step-000004 was written"
    with pytest.raises(UserError, match=kept):
        plan(load_config(config, ["train.lr=5e-4"]))
    assert [s.action for s in plan(load_config(config))][2] == "resume"


def test_extending_max_steps_continues_from_the_last_checkpoint(finished, tmp_path, capsys):
    config = _copy(finished, tmp_path)
    run = tmp_path / "runs" / "lm"
    first = losses(run)
    capsys.readouterr()
    assert ftpipe("run", config, "--no-progress", "train.max_steps=6") == 0
    assert "train.max_steps: 4 -> 6: continues from its last checkpoint" in capsys.readouterr().out
    trained = manifest(run, "train")
    assert trained["resumed_from_step"] == 4 and trained["steps"] == 6 and trained["max_steps"] == 6
    assert trained["extended_from"]["max_steps"] == 4
    assert trained["extended_from"]["target_samples"] == 16 and trained["target_samples"] == 24
    assert losses(run)[:4] == first and len(losses(run)) == 6
    assert (run / "train" / "checkpoints" / "step-000002" / "COMPLETE").is_file(), "earlier checkpoints stay"
    assert manifest(run, "evaluate")["inputs"]["consolidate"] == manifest(run, "consolidate")["run_id"]


def test_force_deletes_the_named_stage_and_says_so(finished, tmp_path, capsys):
    config = _copy(finished, tmp_path)
    run = tmp_path / "runs" / "lm"
    old = (run / "train" / "checkpoints" / "step-000004" / "COMPLETE").stat().st_mtime_ns
    capsys.readouterr()
    assert ftpipe("run", config, "--no-progress", "--force", "train", "train.lr=2e-3") == 0
    assert "train       run     forced" in capsys.readouterr().out
    assert (run / "train" / "checkpoints" / "step-000004" / "COMPLETE").stat().st_mtime_ns != old
    assert manifest(run, "train")["resumed_from_step"] is None


def test_a_code_change_alone_keeps_results_and_warns(finished, monkeypatch, capsys):
    before = [s.fingerprint for s in plan(load_config(finished))]
    monkeypatch.setattr(type(STAGES["train"]), "code_version", lambda self: "0123456789abcdef")
    after = plan(load_config(finished))
    assert [s.fingerprint for s in after] == before and all(s.action == "skip" for s in after)
    capsys.readouterr()
    assert ftpipe("run", finished, "--dry-run") == 0
    err = capsys.readouterr().err
    assert "ftpipe: warning: train was written by other ftpipe code" in err and "kept" in err


def test_a_new_output_version_is_a_change_that_needs_force(finished, monkeypatch):
    monkeypatch.setitem(STAGES, "consolidate", dataclasses.replace(STAGES["consolidate"], version=2))
    with pytest.raises(UserError, match=r"consolidate: \(output version\): 1 -> 2 since it finished"):
        plan(load_config(finished))
    assert plan(load_config(finished), force=("consolidate",))[3].action == "run"


def _member(finished: Path, tmp_path: Path, *overrides: str) -> Path:
    base = load_config(finished)
    member = RunDir(tmp_path / "member-runs" / "lm-member")
    link_shared_data(RunDir(base.run_dir), member)
    text = finished.read_text().replace(str(finished.parent / "runs"), str(tmp_path / "member-runs"))
    config = tmp_path / "member.yaml"
    config.write_text(text.replace("name: lm\n", "name: lm-member\n"))
    return config


@pytest.mark.parametrize("args", [("--force", "shard"), ("data.max_seq_len=24",)])
def test_a_sweep_member_never_writes_through_its_links(finished, tmp_path, args, capsys):
    config = _member(finished, tmp_path)
    base = finished.parent / "runs" / "lm"
    before = _snapshot(base)
    capsys.readouterr()
    assert ftpipe("run", config, "--no-progress", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the sweep base run's" in err[0] and f"base run {base}" in err[0], err
    assert _snapshot(base) == before


def test_a_slurm_stage_job_checks_the_same_before_it_touches_the_stage(finished, tmp_path, monkeypatch):
    """A requeued or late job reads the run's config.yaml: a change there stops it, files untouched."""
    from launch.slurm import run_stage_job

    _copy(finished, tmp_path)
    run = RunDir(tmp_path / "runs" / "lm")
    run.config_file.write_text(run.config_file.read_text().replace("lr: 0.001", "lr: 0.002"))
    before = _snapshot(run.root)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"train: train\.lr: 0\.001 -> 0\.002 since it finished"):
        run_stage_job(run.root, "train", tmp_path)
    assert _snapshot(run.root) == before
