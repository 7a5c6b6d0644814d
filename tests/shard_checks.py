"""Running the shard stage alone on made-up sources, and reading back what it kept and rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import shard
from pipeline.config import RunConfig, validate_config
from pipeline.context import StageContext
from pipeline.run_dir import RunDir
from tests import fixtures


def make_raw(tmp_path: Path, model_dir: Path, sources: list[Path], classify: bool = False,
             name: str | None = None, **data) -> dict:
    build = fixtures.classification_config if classify else fixtures.causal_config
    raw = fixtures.merge(build(tmp_path, model_dir, sources[0]), {"data": data})
    raw["data"]["train"] = [str(s) for s in sources]
    if name:
        raw["name"] = name
    return raw


def make_cfg(tmp_path: Path, model_dir: Path, sources: list[Path], classify: bool = False,
             name: str | None = None, **data) -> RunConfig:
    return validate_config(make_raw(tmp_path, model_dir, sources, classify, name, **data))


def run_shard(cfg: RunConfig) -> dict:
    return shard.run(cfg, StageContext(RunDir(cfg.run_dir), progress=False))


def data_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "shard" / "data"


def rejects_of(cfg: RunConfig) -> list[dict]:
    return [json.loads(line) for line in (data_dir(cfg) / "rejects.jsonl").read_text().splitlines()]


def shard_rows(cfg: RunConfig) -> dict[str, list[dict]]:
    """Every row of every parquet shard, per split, with the shard file it is in."""
    out: dict[str, list[dict]] = {}
    for split in ("train", "eval"):
        files = sorted(data_dir(cfg).glob(f"{split}-*-of-*.parquet"))
        assert len(files) == cfg.data.num_shards
        out[split] = [{**row, "shard": f.name} for f in files for row in pq.read_table(f).to_pylist()]
    return out


def J(obj) -> bytes:
    return json.dumps(obj).encode()
