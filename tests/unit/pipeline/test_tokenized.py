"""Reading a tokenized split checks every unit file against its marker: a file truncated at a record
batch boundary (which Arrow itself reads as fewer rows, no error) or deleted under its marker is a
one-line error naming it. Units reach the disk before their markers."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline import shard, tokenize, tokenized
from pipeline.config import validate_config
from pipeline.errors import UserError
from tests import fixtures
from tests.stage_runs import run_stage, stage_context
from tests.unit.pipeline.test_run_dir import FsyncLog


@pytest.fixture
def split(tmp_path, tiny_llama, monkeypatch):
    """A tokenized train split whose units hold several record batches each."""
    monkeypatch.setattr(tokenize, "BATCH_ROWS", 10)
    data = fixtures.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in fixtures.sentences(120)])
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, data, data={"eval_fraction": 0.0}))
    ctx = stage_context(cfg)
    run_stage(shard, cfg, ctx)
    run_stage(tokenize, cfg, ctx)
    return ctx.run_dir.stage("tokenize") / "train"


def _first_batch_end(path) -> int:
    """Where the stream's first record batch ends: a cut there leaves a stream Arrow reads cleanly."""
    with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
        first = reader.read_next_batch()
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_stream(sink, first.schema)
    writer.write_batch(first)
    return sink.tell()  # before close(): no end-of-stream marker, as in a torn file


def test_a_unit_truncated_at_a_batch_boundary_is_named(split):
    whole = tokenized.open_split(split).num_rows
    path = split / "00001.arrow"
    with open(path, "r+b") as handle:
        handle.truncate(_first_batch_end(path))
    with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
        assert reader.read_all().num_rows == 10  # what every reader saw before: rows silently gone
    with pytest.raises(UserError, match=rf"^{path} has \d+ bytes, but {split / '00001.json'} vouches for"):
        tokenized.open_split(split)
    assert whole > 20


def test_a_unit_deleted_under_its_marker_is_named(split):
    (split / "00000.arrow").unlink()
    with pytest.raises(UserError, match=rf"^{split / '00000.arrow'} is missing, but "):
        tokenized.open_split(split)


def test_a_unit_with_other_rows_than_its_marker_is_named(split):
    marker = split / "00000.json"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "rows": record["rows"] + 1}))
    with pytest.raises(UserError, match=rf"holds {record['rows']} rows, but {marker} vouches for"):
        tokenized.open_split(split)


def test_shard_parts_and_units_reach_the_disk_before_their_markers(tmp_path, tiny_llama, text_data,
                                                                   monkeypatch):
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, text_data))
    ctx = stage_context(cfg)
    log = FsyncLog(monkeypatch)
    run_stage(shard, cfg, ctx)
    piece = "train-00000-of-00002.parquet"
    assert log.first("fsync", piece) < log.first("rename", "parts/00000") < log.first("rename", "done.json")
    run_stage(tokenize, cfg, ctx)
    for name in ("00000.arrow", "00000.rejects.jsonl"):
        assert log.first("fsync", f"train/{name}") < log.first("rename", "train/00000.json")
    merged = log.first("rename", "tokenize/rejects.jsonl")
    assert any(kind == "fsync" and ".rejects.jsonl.tmp-" in path for kind, path in log.events[:merged])
