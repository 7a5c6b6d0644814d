"""Several training sources with per-source weights and limits (data.train entries {path, weight, limit})."""

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from tests import fixtures
from tests.helpers import ftpipe, manifest

SHARD_ONLY = ("--no-progress", "--stages", "shard")


def _data(tmp_path: Path) -> tuple[Path, Path, Path]:
    texts = fixtures.sentences(300, seed=11)
    return tuple(fixtures.write_jsonl(tmp_path / "data" / f"{name}.jsonl", [{"text": t} for t in part])
                 for name, part in (("a", texts[:100]), ("b", texts[100:200]), ("c", texts[200:])))


def _config(tmp_path: Path, model: Path, name: str, train: list) -> Path:
    cfg = fixtures.causal_config(tmp_path, model, tmp_path / "data" / "a.jsonl", name=name,
                                 data={"train": train, "num_shards": 3, "eval_fraction": 0.2})
    return fixtures.write_config(tmp_path / f"{name}.yaml", cfg)


def _rows(run: Path, split: str) -> Counter:
    """(source file name, line) -> times the row is in the split's shards."""
    found: Counter = Counter()
    for path in sorted((run / "shard" / "data").glob(f"{split}-*.parquet")):
        table = pq.read_table(path, columns=["source", "line"]).to_pylist()
        found.update((Path(r["source"]).name, r["line"]) for r in table)
    return found


def test_weights_repeat_or_thin_training_rows_and_limits_cap_a_source(tmp_path, tiny_llama):
    a, b, c = _data(tmp_path)
    config = _config(tmp_path, tiny_llama, "mix", [str(a), {"path": str(b), "weight": 2.0},
                                                   {"path": str(c), "weight": 0.5, "limit": 60}])
    assert ftpipe("run", config, *SHARD_ONLY) == 0
    run = tmp_path / "runs" / "mix"
    train, held = _rows(run, "train"), _rows(run, "eval")
    per_source = {name: Counter(times for (source, _), times in train.items() if source == name)
                  for name in ("a.jsonl", "b.jsonl", "c.jsonl")}
    assert set(per_source["a.jsonl"]) == {1} and set(per_source["b.jsonl"]) == {2}
    assert set(per_source["c.jsonl"]) == {1} and set(held.values()) == {1}, "held-out rows count once"
    assert not set(train) & set(held), "a row is never in both splits"
    c_rows = {line for source, line in set(train) | set(held) if source == "c.jsonl"}
    c_kept = {line for source, line in train if source == "c.jsonl"}
    c_held = {line for source, line in held if source == "c.jsonl"}
    assert max(c_rows) <= 60 and len(c_held) + len(c_kept) < 60, (
        "limit: only the first 60 rows, weight halves")
    assert 10 <= len(c_kept) <= 40
    sources = {Path(s["path"]).name: s for s in manifest(run, "shard")["sources"]}
    assert sources["c.jsonl"]["rows"] == 60 and sources["c.jsonl"]["limit"] == 60
    assert sources["b.jsonl"]["train_copies"] == 2 * sum(1 for s, _ in train if s == "b.jsonl")
    assert manifest(run, "shard")["splits"]["train"]["rows"] == sum(train.values())

    # Changing one source's settings re-shards only that source; the thinning is stable.
    assert ftpipe("run", config, *SHARD_ONLY, "--force", "shard") == 0
    assert _rows(run, "train") == train
    changed = _config(tmp_path, tiny_llama, "mix", [str(a), {"path": str(b), "weight": 3.0},
                                                    {"path": str(c), "weight": 0.5, "limit": 60}])
    assert ftpipe("run", changed, *SHARD_ONLY) == 2  # a finished stage is redone only when forced
    assert ftpipe("run", changed, *SHARD_ONLY, "--force", "shard") == 0
    assert manifest(run, "shard")["ran_sources"] == 1 and manifest(run, "shard")["reused_sources"] == 2
    assert set(Counter(t for (s, _), t in _rows(run, "train").items() if s == "b.jsonl")) == {3}


@pytest.mark.parametrize("entry,message", [
    ({"path": "x.jsonl", "weight": 0}, "data.train.1.weight: Input should be greater than 0 (got 0)"),
    ({"path": "x.jsonl", "limit": -3}, "data.train.1.limit: Input should be greater than or equal to 1"),
    ({"path": "x.jsonl", "wieght": 2},
     "unknown key 'data.train.1.wieght' (did you mean 'data.train.1.weight'?)"),
    ({"weight": 2}, "data.train.1: give exactly one of path (a file, glob or save_to_disk folder) or hf"),
    ({"path": "x.jsonl", "revision": "v1"}, "data.train.1: revision only applies to hf sources"),
    (5, "data.train.1: Input should be a valid string (got 5)"),
])
def test_source_entry_errors_name_the_key(tmp_path, tiny_llama, entry, message):
    a, _, _ = _data(tmp_path)
    config = _config(tmp_path, tiny_llama, "bad", [str(a), entry])
    with pytest.raises(UserError) as err:
        load_config(config)
    assert message in str(err.value)


def test_a_glob_entry_that_matches_nothing_is_named(tmp_path, tiny_llama, capsys):
    a, _, _ = _data(tmp_path)
    config = _config(tmp_path, tiny_llama, "none", [str(a), {"path": str(tmp_path / "nothing-*.jsonl")}])
    assert ftpipe("run", config, *SHARD_ONLY) == 2
    assert "data.train[1].path: no file matches" in capsys.readouterr().err
