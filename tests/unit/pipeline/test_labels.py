"""Classification label names: inferred from the training split when data.labels is absent (sorted,
in the shard manifest, seen by the later stages), cached per source, and checked against
model.num_labels; reasons for unmatched rows name data.labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import labels, shard, units
from pipeline.config import RunConfig, validate_config
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.formats import RowValidator
from pipeline.run_dir import RunDir
from pipeline.stages import Stage, shard_inputs
from tests import fixtures
from tests.shard_checks import make_raw, rejects_of, run_shard, shard_rows


def _cfg(tmp_path: Path, model: Path, train: list[Path], **data) -> RunConfig:
    raw = make_raw(tmp_path, model, train, classify=True, **{"labels": None, "eval_fraction": 0.0, **data})
    return validate_config(raw)


def _rows(pairs: list[tuple[str, object]]) -> list[dict]:
    return [{"text": f"{text} {i}", "label": label} for i, (text, label) in enumerate(pairs)]


@pytest.fixture
def tweets(tmp_path) -> tuple[Path, Path, Path]:
    a = fixtures.write_jsonl(tmp_path / "a.jsonl", _rows([("buy now", "spam"), ("hello", "ham")] * 3))
    b = fixtures.write_jsonl(tmp_path / "b.jsonl", _rows([("fry", "eggs"), ("hi", "ham")] * 3))
    held = fixtures.write_jsonl(tmp_path / "held.jsonl", _rows([("cheap", "spam"), ("tofu", "tofu")]))
    return a, b, held


def test_string_labels_are_inferred_sorted(tmp_path, tiny_bert, tweets):
    a, b, held = tweets
    cfg = _cfg(tmp_path, tiny_bert, [a, b], eval=[str(held)], max_reject_fraction=0.2)
    assert cfg.model.num_labels is None  # neither data.labels nor model.num_labels is needed
    manifest = run_shard(cfg)
    names = ["eggs", "ham", "spam"]
    assert manifest["labels"] == names
    rows = shard_rows(cfg)
    assert {(r["text"].split()[0], r["label"]) for r in rows["train"]} == {
        ("buy", 2), ("hello", 1), ("fry", 0), ("hi", 1)}
    assert [(r["text"], r["label"]) for r in rows["eval"]] == [("cheap 0", 2)]
    [reject] = rejects_of(cfg)
    assert reject["reason"].startswith(
        "unknown label 'tofu': not among the labels of data.train; data.labels can name them")


def test_the_scan_is_cached_per_source_and_redone_only_for_a_changed_one(tmp_path, tiny_bert, tweets,
                                                                       monkeypatch):
    a, b, _ = tweets
    cfg = _cfg(tmp_path, tiny_bert, [a, b])
    run_dir = RunDir(cfg.run_dir)
    run_dir.stage("shard").mkdir(parents=True)
    assert shard.UNITS.units(cfg, run_dir)[0].labels == ("eggs", "ham", "spam")
    scanned = []
    real_scan = labels.scan
    monkeypatch.setattr(labels, "scan", lambda c, source: scanned.append(source.path) or real_scan(c, source))
    # Each task of a job array (or worker process) lists the units itself: from the cached scans.
    for rank in (1, 0):
        units._LISTED.clear()
        units.run_task(shard.UNITS, cfg, run_dir, rank, 2)
    assert scanned == []
    assert run_shard(cfg)["labels"] == ["eggs", "ham", "spam"] and scanned == []
    fixtures.write_jsonl(b, _rows([("fry", "eggs"), ("moo", "cow")]))
    assert shard.UNITS.units(cfg, run_dir)[1].labels == ("cow", "eggs", "ham", "spam")
    assert scanned == [b]


def test_inferred_labels_must_match_model_num_labels(tmp_path, tiny_bert, tweets):
    a, b, _ = tweets
    cfg = _cfg(tmp_path, tiny_bert, [a, b], num_workers=1)
    cfg.model.num_labels = 2
    with pytest.raises(UserError, match=r"^model.num_labels is 2 but data.train has 3 labels in field "
                                        r"'label' \(eggs, ham, spam\); set data.labels"):
        run_shard(cfg)
    cfg.model.num_labels = 3  # names given a count (a user's tweets file with num_labels: 2, say)
    assert run_shard(cfg)["labels"] == ["eggs", "ham", "spam"]


def test_integer_labels_are_indices(tmp_path, tiny_bert):
    data = fixtures.write_jsonl(tmp_path / "n.jsonl", _rows([("a", 0), ("b", 2), ("c", "1")]))
    assert labels.infer_labels({0, 2, "1"}, _cfg(tmp_path, tiny_bert, [data])) == ["0", "1", "2"]
    cfg = _cfg(tmp_path, tiny_bert, [data])
    cfg.model.num_labels = 3
    assert labels.infer_labels({0, 2, "1"}, cfg) is None  # model.num_labels given: rows give indices
    assert run_shard(cfg)["labels"] is None


def test_integers_beside_inferred_names_are_indices_as_with_data_labels(tmp_path, tiny_bert):
    rows = _rows([("a", 1), ("b", "ham"), ("c", "spam"), ("d", 2)])
    data = fixtures.write_jsonl(tmp_path / "m.jsonl", rows)
    cfg = _cfg(tmp_path, tiny_bert, [data], max_reject_fraction=0.5)
    assert run_shard(cfg)["labels"] == ["ham", "spam"]
    ids = sorted((r["text"][0], r["label"]) for r in shard_rows(cfg)["train"])
    assert ids == [("a", 1), ("b", 0), ("c", 1)]
    assert [r["reason"] for r in rejects_of(cfg)] == [
        "unknown label 2: not among the labels of data.train; data.labels can name them (expected one of "
        "['ham', 'spam'])"]


def test_given_labels_reject_rows_naming_data_labels(tmp_path, tiny_bert, tweets):
    cfg = _cfg(tmp_path, tiny_bert, [tweets[0]], labels=["ham", "spam"])
    check = RowValidator(cfg.data, cfg.model.num_labels, cfg.data.labels)
    row, reason = check({"text": "x", "label": "eggs"})
    assert row is None
    assert reason == "unknown label 'eggs': not in data.labels (expected one of ['ham', 'spam'])"


def _seen(cfg: RunConfig, ctx) -> dict:
    return {"labels": cfg.data.labels, "num_labels": cfg.model.num_labels}


def test_the_stages_after_shard_see_the_inferred_labels(tmp_path, tiny_bert, tweets):
    cfg = _cfg(tmp_path, tiny_bert, list(tweets[:2]))
    run_dir = RunDir(cfg.run_dir)
    run_dir.stage("shard").mkdir(parents=True)
    run_dir.write_manifest("shard", {"labels": ["eggs", "ham", "spam"]})
    later = Stage("train", f"{__name__}:_seen", ("shard",), shard_inputs, ())
    seen = later.run(cfg, StageContext(run_dir, progress=False))
    assert seen == {"labels": ["eggs", "ham", "spam"], "num_labels": 3}
    assert cfg.data.labels is None  # the config itself (what fingerprints read) is unchanged
