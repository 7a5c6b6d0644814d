"""Stage 2: parquet shards -> tokenized Arrow files that training memory-maps.

Each shard is tokenized in batches and written as an Arrow IPC stream under a temporary name; its
stats file, written after the rename, is the shard's completion marker, so a killed run redoes
only the shards without one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.models import load_tokenizer
from pipeline.run_dir import atomic_write_json, remove_stale_tmp

BATCH_ROWS = 1000
SPLITS = ("train", "eval")


def output_schema(classification: bool) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("num_targets", pa.int32())]
    if classification:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


class Encoder:
    """Turns a batch of rows into token ids for the task, counting truncation."""

    def __init__(self, tokenizer, max_seq_len: int, classification: bool):
        self.tokenizer = tokenizer
        self.max_len = max_seq_len
        self.classification = classification

    def __call__(self, rows: dict[str, list]) -> tuple[dict[str, list], int]:
        encoded = self.tokenizer(rows["text"], add_special_tokens=True)["input_ids"]
        if self.classification:
            ids, truncated = self._truncate_classification(rows["text"], encoded)
            return {"input_ids": ids, "num_targets": [1] * len(ids), "label": rows["label"]}, truncated
        ids = [self._with_eos(seq) for seq in encoded]
        truncated = sum(len(seq) > self.max_len for seq in ids)
        ids = [seq[: self.max_len] for seq in ids]
        return {"input_ids": ids, "num_targets": [max(0, len(s) - 1) for s in ids]}, truncated

    def _with_eos(self, seq: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return seq + [eos] if eos is not None and (not seq or seq[-1] != eos) else seq

    def _truncate_classification(self, texts: list[str], encoded: list[list[int]]):
        # Re-encoding only the long rows keeps the tokenizer's closing special tokens in place.
        long = [i for i, seq in enumerate(encoded) if len(seq) > self.max_len]
        if long:
            again = self.tokenizer([texts[i] for i in long], truncation=True, max_length=self.max_len)
            for i, seq in zip(long, again["input_ids"]):
                encoded[i] = seq
        return encoded, len(long)


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_shard(source: Path, target: Path, encoder: Encoder) -> dict[str, Any]:
    """Write `target` (Arrow IPC stream) from parquet `source`; return the shard's counts."""
    schema = output_schema(encoder.classification)
    stats = {"rows": 0, "tokens": 0, "truncated": 0, "max_len": 0}
    tmp = target.with_name(f".{target.name}.tmp-w")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS):
            columns, truncated = encoder(batch.to_pydict())
            writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
            lengths = [len(s) for s in columns["input_ids"]]
            stats["rows"] += len(lengths)
            stats["tokens"] += sum(lengths)
            stats["truncated"] += truncated
            stats["max_len"] = max([stats["max_len"], *lengths])
    tmp.replace(target)
    return stats


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Tokenize every shard of every split that has no completion marker yet."""
    shard_manifest = ctx.run_dir.read_manifest("shard")
    assert shard_manifest is not None, "tokenize runs after shard"
    source_dir = ctx.run_dir.stage("shard") / "data"
    out = ctx.run_dir.stage("tokenize")
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    encoder = Encoder(tokenizer, cfg.data.max_seq_len, cfg.data.format == "classification")
    manifest: dict[str, Any] = {"splits": {}, "reused_shards": 0, "pad_token_id": pad_token_id(tokenizer)}
    for split in SPLITS:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(folder)
        shards = []
        for index, name in enumerate(shard_manifest["splits"][split]["files"]):
            stats, reused = _tokenize_once(source_dir / name, folder, index, encoder)
            manifest["reused_shards"] += reused
            shards.append(stats)
        manifest["splits"][split] = _summarize(shards)
    return manifest


def _tokenize_once(source: Path, folder: Path, index: int, encoder: Encoder) -> tuple[dict, bool]:
    marker = folder / f"{index:05d}.json"
    if marker.is_file():
        return json.loads(marker.read_text()), True
    stats = tokenize_shard(source, folder / f"{index:05d}.arrow", encoder)
    stats["file"] = f"{index:05d}.arrow"
    atomic_write_json(marker, stats)
    return stats, False


def _summarize(shards: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(s["rows"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    return {"rows": rows, "tokens": tokens, "truncated": sum(s["truncated"] for s in shards),
            "max_len": max((s["max_len"] for s in shards), default=0),
            "mean_len": tokens / rows if rows else 0.0, "files": [s["file"] for s in shards]}


def open_split(folder: Path) -> pa.Table:
    """Memory-map a tokenized split: the rows stay on disk until a batch touches them."""
    tables = []
    for path in sorted(folder.glob("[0-9]*.arrow")):
        with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
            tables.append(reader.read_all())
    if not tables:
        return output_schema(False).empty_table()
    return pa.concat_tables(tables)
