"""The hash split into train and eval: stable across runs, file order and file layout."""

from __future__ import annotations

import random

from pipeline.config import RunConfig
from tests import fixtures
from tests.shard_checks import make_cfg, run_shard, shard_rows


def _placement(cfg: RunConfig) -> dict[str, tuple[str, str]]:
    return {r["text"]: (split, r["shard"]) for split, rows in shard_rows(cfg).items() for r in rows}


def test_split_is_stable_across_runs_and_file_order(tmp_path, model_dir):
    texts = [f"{i} {s}" for i, s in enumerate(fixtures.sentences(2000, seed=3))]
    a = fixtures.write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": t} for t in texts[:1200]])
    b = fixtures.write_jsonl(tmp_path / "src" / "b.jsonl", [{"text": t} for t in texts[1200:]])
    shuffled = texts[:]
    random.Random(5).shuffle(shuffled)
    one = fixtures.write_jsonl(tmp_path / "src" / "all.jsonl", [{"text": t} for t in shuffled])

    common = {"eval_fraction": 0.1, "num_shards": 3}
    first = make_cfg(tmp_path, model_dir, [a, b], name="first", **common)
    second = make_cfg(tmp_path / "elsewhere", model_dir, [b, a], name="second", **common)
    third = make_cfg(tmp_path, model_dir, [one], name="third", **common)
    assert len({first.run_dir, second.run_dir, third.run_dir}) == 3
    placed = []
    for cfg in (first, second, third):
        run_shard(cfg)
        placed.append(_placement(cfg))

    assert len(placed[0]) == 2000
    assert placed[0] == placed[1] == placed[2]
    eval_share = sum(split == "eval" for split, _ in placed[0].values()) / 2000
    assert 0.05 <= eval_share <= 0.15


def test_split_with_zero_eval_fraction_keeps_everything_in_train(tmp_path, model_dir):
    source = fixtures.write_jsonl(tmp_path / "d.jsonl", [{"text": f"{i} row"} for i in range(300)])
    cfg = make_cfg(tmp_path, model_dir, [source], eval_fraction=0.0)
    manifest = run_shard(cfg)
    assert manifest["splits"]["train"]["rows"] == 300 and manifest["splits"]["eval"]["rows"] == 0


def test_explicit_eval_files_bypass_the_hash_split(tmp_path, model_dir):
    train_texts = [f"train {i} {s}" for i, s in enumerate(fixtures.sentences(200, seed=1))]
    eval_texts = [f"eval {i} {s}" for i, s in enumerate(fixtures.sentences(50, seed=2))]
    train = fixtures.write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train_texts])
    held = fixtures.write_jsonl(tmp_path / "held.jsonl", [{"text": t} for t in eval_texts])
    cfg = make_cfg(tmp_path, model_dir, [train], eval=[str(held)], eval_fraction=0.5)
    manifest = run_shard(cfg)
    rows = shard_rows(cfg)
    assert sorted(r["text"] for r in rows["train"]) == sorted(train_texts)
    assert sorted(r["text"] for r in rows["eval"]) == sorted(eval_texts)
    assert {r["source"] for r in rows["train"]} == {str(train)}
    assert {r["source"] for r in rows["eval"]} == {str(held)}
    assert manifest["splits"]["train"]["rows"] == 200 and manifest["splits"]["eval"]["rows"] == 50
