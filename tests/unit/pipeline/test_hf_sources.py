"""Hugging Face datasets as data.train / data.eval sources: a local dataset repo folder of parquet
files through datasets.load_dataset, and a save_to_disk folder through datasets.load_from_disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import hf_sources
from pipeline.config import RunConfig, validate_config
from pipeline.digests import DigestCache
from pipeline.errors import UserError
from pipeline.sources import check_paths, source_digest, source_files
from pipeline.stages import shard_inputs
from tests import fixtures
from tests.shard_checks import make_raw, rejects_of, run_shard, shard_rows


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """datasets' cache in the test's folder (offline: conftest sets HF_HUB_OFFLINE)."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    hf_sources.load.cache_clear()
    yield cache
    hf_sources.load.cache_clear()


def make_cfg(tmp_path: Path, model: Path, train: list, **data) -> RunConfig:
    raw = make_raw(tmp_path, model, [tmp_path], **data)
    raw["data"]["train"] = train
    return validate_config(raw)


def write_repo(folder: Path, texts: list[str | None]) -> Path:
    """A dataset repo folder as on the hub: data/train-*.parquet, read by load_dataset(folder)."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": texts, "other": list(range(len(texts)))})
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    return folder


def write_saved(folder: Path, train: list[str], test: list[str]) -> Path:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "test": datasets.Dataset.from_dict({"text": test})}).save_to_disk(str(folder))
    return folder


def test_repo_folder_and_saved_dataset_shard_with_weights_limits_and_rejects(tmp_path, tiny_llama, hf_cache):
    texts = fixtures.sentences(60, seed=3)
    repo = write_repo(tmp_path / "repo", texts[:30] + [None, ""])
    saved = write_saved(tmp_path / "saved", texts[30:50], texts[50:])
    cfg = make_cfg(tmp_path, tiny_llama, num_shards=2, max_reject_fraction=0.1,
                   train=[{"hf": str(repo)}, {"path": str(saved), "weight": 2.0, "limit": 8}],
                   eval=[{"path": str(saved), "split": "test"}])
    manifest = run_shard(cfg)

    rows = shard_rows(cfg)
    repo_name, saved_name = f"hf:{repo}:train", f"{saved}:train"
    assert sorted(r["text"] for r in rows["train"] if r["source"] == repo_name) == sorted(texts[:30])
    limited = [r["text"] for r in rows["train"] if r["source"] == saved_name]
    assert sorted(limited) == sorted(texts[30:38] * 2)  # its first 8 rows, each twice
    assert sorted(r["text"] for r in rows["eval"]) == sorted(texts[50:])
    assert [(r["file"], r["line"]) for r in rejects_of(cfg)] == [(repo_name, 31), (repo_name, 32)]
    first = manifest["sources"][0]
    assert first["dataset"]["kind"] == "hf" and first["dataset"]["split"] == "train"
    assert "revision" in first["dataset"] and first["rejected"] == 2 and first["rows"] == 30


def test_fingerprint_is_the_datasets_own_and_the_columns_read(tmp_path, tiny_llama, hf_cache):
    repo = write_repo(tmp_path / "repo", fixtures.sentences(10, seed=4))
    cfg = make_cfg(tmp_path, tiny_llama, train=[{"hf": str(repo), "revision": "main"}])
    source, cache = source_files(cfg)[0], DigestCache.of(cfg.output_dir)
    digest = source_digest(source, cfg.data, cache)
    assert digest["fingerprint"] == hf_sources.load(source.dataset)._fingerprint
    assert digest["columns"] == ["text"] and digest["revision"] == "main"
    assert shard_inputs(cfg, cache)["data files"] == {f"hf:{repo}:train@main": digest}

    write_repo(repo, fixtures.sentences(10, seed=5))  # new content: a new dataset fingerprint
    hf_sources.load.cache_clear()
    assert source_digest(source, cfg.data, cache)["fingerprint"] != digest["fingerprint"]


def test_a_class_label_column_names_the_labels_in_its_id_order(tmp_path, tiny_bert, hf_cache):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["pos", "neg"])})
    rows = {"text": fixtures.sentences(8, seed=7), "label": [0, 1] * 4}
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(saved))
    raw = make_raw(tmp_path, tiny_bert, [tmp_path], classify=True, labels=None, eval_fraction=0.0)
    raw["data"]["train"] = [{"path": str(saved)}]
    cfg = validate_config(raw)
    assert run_shard(cfg)["labels"] == ["pos", "neg"]  # the dataset's order, not sorted
    assert sorted((r["text"], r["label"]) for r in shard_rows(cfg)["train"]) == sorted(zip(*rows.values()))


def cache_as_hub_download(cache: Path, repo_id: str, texts: list[str]) -> None:
    """What downloading `repo_id` (parquet files) leaves in datasets' cache, without the network: the
    prepared Arrow files under <cache>/<org>___<name>/default/0.0.0/<hash>/."""
    import datasets

    source = write_repo(cache.parent / "download", texts) / "data" / "train-00000-of-00001.parquet"
    datasets.load_dataset("parquet", data_files={"train": str(source)}, split="train")
    prepared = next((cache / "parquet").rglob("dataset_info.json")).parent
    target = cache / repo_id.replace("/", "___") / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(target / arrow.name.replace("parquet-", f"{repo_id.split('/')[1]}-"))


def test_a_hub_dataset_loads_offline_from_the_cache(tmp_path, tiny_llama, hf_cache):
    texts = fixtures.sentences(12, seed=6)
    cache_as_hub_download(hf_cache, "someone/tweets", texts)
    cfg = make_cfg(tmp_path, tiny_llama, train=[{"hf": "someone/tweets"}])
    check_paths(cfg)
    run_shard(cfg)
    rows = shard_rows(cfg)
    assert sorted(r["text"] for split in rows.values() for r in split) == sorted(texts)
    assert {r["source"] for split in rows.values() for r in split} == {"hf:someone/tweets:train"}


def test_a_hub_name_neither_cached_nor_reachable_is_one_line(tmp_path, tiny_llama, hf_cache):
    cfg = make_cfg(tmp_path, tiny_llama, train=[{"hf": "nobody/no-such-dataset"}])
    with pytest.raises(UserError) as err:
        check_paths(cfg)
    message = str(err.value)
    assert message.startswith("data.train[0].hf: 'nobody/no-such-dataset' is neither a local dataset folder "
                              "nor in the Hugging Face datasets cache")
    assert "the hub cannot be reached" in message and "\n" not in message


def test_a_missing_split_of_a_saved_dataset_names_the_key(tmp_path, tiny_llama, hf_cache):
    saved = write_saved(tmp_path / "saved", ["a b"], ["c d"])
    cfg = make_cfg(tmp_path, tiny_llama, train=[{"path": str(saved), "split": "valid"}])
    wanted = r"^data.train\[0\].split: .* has no split 'valid' \(it has train, test\)$"
    with pytest.raises(UserError, match=wanted):
        check_paths(cfg)
