"""Stage 1: read raw sources, validate every row, split train/eval by a stable hash, write shards.

Rows stream from the sources to per-shard parquet writers in small batches, so memory does not
grow with the data. Rejected rows go to rejects.jsonl with file, line and reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig, expand_sources
from pipeline.context import StageContext
from pipeline.formats import RowValidator, has_surrogates, shard_schema
from pipeline.errors import UserError
from pipeline.run_dir import atomic_dir

FLUSH_ROWS = 2048


@dataclass
class RawRow:
    line: int
    row: dict[str, Any] | None
    error: str | None = None
    raw: str = ""


def read_rows(path: Path, text_field: str) -> Iterator[RawRow]:
    """Yield every row of a jsonl / parquet / csv / txt file with its 1-based line number."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        yield from _read_text_lines(path, text_field)


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n"), ""
            except UnicodeDecodeError as err:
                yield number, None, f"invalid UTF-8 at byte {err.start}"


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    for number, text, problem in _decoded_lines(path):
        if text is None:
            yield RawRow(number, None, problem)
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            yield RawRow(number, None, f"malformed JSON: {err.msg} at column {err.colno}", text)
            continue
        if not isinstance(row, dict):
            yield RawRow(number, None, f"expected a JSON object, got {type(row).__name__}", text)
        else:
            yield RawRow(number, row, raw=text)


def _read_text_lines(path: Path, text_field: str) -> Iterator[RawRow]:
    for number, text, problem in _decoded_lines(path):
        if text is None:
            yield RawRow(number, None, problem)
        elif text.strip():
            yield RawRow(number, {text_field: text}, raw=text)


def _read_csv(path: Path, delimiter: str) -> Iterator[RawRow]:
    # surrogateescape keeps undecodable bytes visible so one bad row is rejected, not the file.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for row in reader:
            number = reader.line_num
            values = [v for v in row.values() if isinstance(v, str)]
            if any(has_surrogates(v) for v in values):
                yield RawRow(number, None, "invalid UTF-8")
            elif None in row:
                yield RawRow(number, None, "more fields than the header")
            else:
                yield RawRow(number, dict(row), raw=delimiter.join(values))


def _read_parquet(path: Path) -> Iterator[RawRow]:
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=FLUSH_ROWS):
        try:
            rows: list[dict | None] = batch.to_pylist()
        except UnicodeDecodeError:
            rows = _decode_rows_one_by_one(batch)
        for row in rows:
            number += 1
            yield RawRow(number, row) if row is not None else RawRow(number, None, "invalid UTF-8")


def _decode_rows_one_by_one(batch: pa.RecordBatch) -> list[dict | None]:
    """Some writers put invalid UTF-8 in string columns; reject those rows, keep the others."""
    as_binary = pa.RecordBatch.from_arrays(
        [c.cast(pa.binary()) if pa.types.is_string(c.type) else c for c in batch.columns],
        names=batch.schema.names)
    rows: list[dict | None] = []
    for row in as_binary.to_pylist():
        try:
            rows.append({k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in row.items()})
        except UnicodeDecodeError:
            rows.append(None)
    return rows


def row_hash(row: dict[str, Any]) -> bytes:
    return hashlib.blake2b(json.dumps(row, sort_keys=True).encode(), digest_size=16).digest()


@dataclass
class SplitWriter:
    """Buffers rows per shard and appends them to parquet files in batches."""

    folder: Path
    split: str
    num_shards: int
    schema: pa.Schema
    buffers: list[list[dict]] = field(default_factory=list)
    writers: list[pq.ParquetWriter | None] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buffers = [[] for _ in range(self.num_shards)]
        self.writers = [None] * self.num_shards
        self.counts = [0] * self.num_shards

    def name(self, shard: int) -> str:
        return f"{self.split}-{shard:05d}-of-{self.num_shards:05d}.parquet"

    def add(self, shard: int, row: dict[str, Any]) -> None:
        self.buffers[shard].append(row)
        self.counts[shard] += 1
        if len(self.buffers[shard]) >= FLUSH_ROWS:
            self._flush(shard)

    def _flush(self, shard: int) -> None:
        if self.writers[shard] is None:
            self.writers[shard] = pq.ParquetWriter(self.folder / self.name(shard), self.schema)
        table = pa.Table.from_pylist(self.buffers[shard], schema=self.schema)
        self.writers[shard].write_table(table)
        self.buffers[shard].clear()

    def close(self) -> dict[str, Any]:
        for shard in range(self.num_shards):
            self._flush(shard)
            self.writers[shard].close()
        files = [self.name(s) for s in range(self.num_shards)]
        return {"rows": sum(self.counts), "files": files, "rows_per_shard": list(self.counts)}


class Sharder:
    """Routes valid rows to a split and shard by hash, rejects to rejects.jsonl."""

    def __init__(self, cfg: RunConfig, folder: Path, rejects: io.TextIOBase):
        self.data = cfg.data
        self.validate = RowValidator(cfg.data, cfg.model.num_labels)
        schema = shard_schema(cfg.data)
        self.writers = {s: SplitWriter(folder, s, cfg.data.num_shards, schema) for s in ("train", "eval")}
        self.rejects = rejects
        self.sources: list[dict[str, Any]] = []

    def add_file(self, path: Path, held_out: bool) -> None:
        kept = rejected = 0
        for item in read_rows(path, self.data.text_field):
            row, problem = self.validate(item.row) if item.row is not None else (None, item.error)
            if row is None:
                rejected += 1
                self._reject(path, item, problem)
                continue
            kept += 1
            self._route(row, path, item.line, held_out)
        self.sources.append({"path": str(path), "rows": kept, "rejected": rejected})

    def _route(self, row: dict[str, Any], path: Path, line: int, held_out: bool | None) -> None:
        digest = row_hash(row)
        if held_out is None:
            held_out = int.from_bytes(digest[:8], "big") / 2**64 < self.data.eval_fraction
        shard = int.from_bytes(digest[8:], "big") % self.data.num_shards
        self.writers["eval" if held_out else "train"].add(shard, {**row, "source": str(path), "line": line})

    def _reject(self, path: Path, item: RawRow, reason: str | None) -> None:
        record = {"file": str(path), "line": item.line, "reason": reason, "row": item.raw[:500]}
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish(self) -> dict[str, Any]:
        return {split: writer.close() for split, writer in self.writers.items()}


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Shard the configured sources into `<run>/shard/{train,eval}-*.parquet`."""
    out = ctx.run_dir.stage("shard")
    train_files = expand_sources(cfg.data.train, "data.train")
    eval_files = expand_sources(cfg.data.eval, "data.eval") if cfg.data.eval else []
    with atomic_dir(out / "data") as tmp, open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rejects:
        sharder = Sharder(cfg, tmp, rejects)
        for path in train_files:
            sharder.add_file(path, held_out=None if not eval_files else False)
        for path in eval_files:
            sharder.add_file(path, held_out=True)
        splits = sharder.finish()
    manifest = {"splits": splits, "sources": sharder.sources,
                "rejected": sum(s["rejected"] for s in sharder.sources), "rejects_file": "data/rejects.jsonl"}
    _check_outcome(cfg, manifest, out)
    return manifest


def _check_outcome(cfg: RunConfig, manifest: dict[str, Any], out: Path) -> None:
    kept = sum(s["rows"] for s in manifest["sources"])
    rejected = manifest["rejected"]
    where = out / "data" / "rejects.jsonl"
    if manifest["splits"]["train"]["rows"] == 0:
        raise UserError(f"data.train: no valid training rows ({rejected} rejected, see {where})")
    share = rejected / max(1, kept + rejected)
    if share > cfg.data.max_reject_fraction:
        raise UserError(
            f"data: {rejected} of {kept + rejected} rows rejected ({share:.1%} > "
            f"data.max_reject_fraction {cfg.data.max_reject_fraction:.1%}); see {where}")
