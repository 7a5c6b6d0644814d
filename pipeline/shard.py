"""Stage 1: read raw sources, validate every row, split train/eval by a stable hash, write shards.

Rows stream from the sources to per-shard parquet writers in small batches, so memory does not
grow with the data. Rejected rows go to rejects.jsonl with file, line and reason. Each source file
is one task (data.num_workers run in parallel) that writes its own piece of every shard; the
pieces are cached per file and merged, in source order, into the shard files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.formats import RowValidator, has_surrogates, shard_schema
from pipeline.errors import UserError
from pipeline.parallel import run_tasks
from pipeline.digests import DigestCache, fingerprint
from pipeline.run_dir import RunDir, atomic_dir, atomic_write_json, remove_stale_tmp
from pipeline.sources import SourceFile, source_files
from pipeline.stages import NOT_SHARD_KEYS, STAGES

FLUSH_ROWS = 2048
MARKER = "done.json"


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


def copies(digest: bytes, weight: float) -> int:
    """floor(weight) copies, one more for a stable share frac(weight) of rows (by their hash)."""
    whole, fraction = divmod(weight, 1.0)
    # Bytes 8.. pick the shard; 4..8 are independent of them and of the split (0..8 as a whole).
    return int(whole) + (int.from_bytes(digest[4:8], "big") / 2**32 < fraction)


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

    def add_file(self, source: SourceFile) -> None:
        kept = rejected = train_rows = 0
        for item in read_rows(source.path, self.data.text_field):
            if source.limit is not None and kept >= source.limit:
                break
            row, problem = self.validate(item.row) if item.row is not None else (None, item.error)
            if row is None:
                rejected += 1
                self._reject(source.path, item, problem)
                continue
            kept += 1
            train_rows += self._route(row, source, item.line)
        self.sources.append({"path": str(source.path), "rows": kept, "rejected": rejected, "weight": source.weight,
                             "limit": source.limit, "train_copies": train_rows})

    def _route(self, row: dict[str, Any], source: SourceFile, line: int) -> int:
        """Write the row to its split and shard (training rows `weight` times); return train copies."""
        digest = row_hash(row)
        held_out = source.held_out
        if held_out is None:
            held_out = int.from_bytes(digest[:8], "big") / 2**64 < self.data.eval_fraction
        shard = int.from_bytes(digest[8:], "big") % self.data.num_shards
        record = {**row, "source": str(source.path), "line": line}
        times = 1 if held_out else copies(digest, source.weight)
        for _ in range(times):
            self.writers["eval" if held_out else "train"].add(shard, record)
        return 0 if held_out else times

    def _reject(self, path: Path, item: RawRow, reason: str | None) -> None:
        record = {"file": str(path), "line": item.line, "reason": reason, "row": item.raw[:500]}
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish(self) -> dict[str, Any]:
        return {split: writer.close() for split, writer in self.writers.items()}


SPLITS = ("train", "eval")


def shard_unit_fingerprints(cfg: RunConfig, sources: list[SourceFile]) -> list[str]:
    """One per source file: what its shard pieces depend on (its content and settings, not the
    other files)."""
    cache = DigestCache.of(cfg.output_dir)
    base = {"data": cfg.data.model_dump(exclude=NOT_SHARD_KEYS | {"train", "eval"}),
            "num_labels": cfg.model.num_labels, "code": STAGES["shard"].code_version()}
    return [fingerprint({**base, "file": str(s.path), "digest": cache.digest(s.path), "held_out": s.held_out,
                         "weight": s.weight, "limit": s.limit}) for s in sources]


def piece_dir(out: Path, rank: int) -> Path:
    return out / "parts" / f"{rank:05d}"


def run_shard(cfg: RunConfig, run_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Task `rank` of `world_size` (one per source file): that file's piece of every shard of both
    splits, its rejects and, last, its marker. A marker with the same fingerprint means done."""
    listed = source_files(cfg)
    assert len(listed) == world_size, (len(listed), world_size)
    expected = shard_unit_fingerprints(cfg, [listed[rank]])[0]
    folder = piece_dir(RunDir(run_dir).stage("shard"), rank)
    cached = _read_marker(folder / MARKER)
    if cached is not None and cached["fingerprint"] == expected:
        return cached
    with atomic_dir(folder) as tmp, open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rejects:
        sharder = Sharder(cfg, tmp, rejects)
        sharder.add_file(listed[rank])
        result = {"fingerprint": expected, "source": sharder.sources[0], "splits": sharder.finish()}
    atomic_write_json(folder / MARKER, result)
    return result


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Shard the configured sources into `<run>/shard/data/{train,eval}-*.parquet`.

    Map: one task per source file writes that file's rows, routed by hash, into its own piece of
    every shard (`parts/NNNNN/`), reused while the file, the shard keys and the code are unchanged.
    Merge: each shard file is its pieces in source order, i.e. the rows a single pass would write.
    """
    out = ctx.run_dir.stage("shard")
    listed = source_files(cfg)
    ranks = list(range(len(listed)))
    reused = _current(out, shard_unit_fingerprints(cfg, listed))
    results = {d.rank: d.result for d in run_tasks(run_shard, cfg, ctx.run_dir.root, ranks, len(listed),
                                                  cfg.data.num_workers)}
    pieces = [results[r] for r in ranks]
    _remove_stale_pieces(out, len(listed))
    with atomic_dir(out / "data") as tmp:
        splits = {split: _merge_split(cfg, out, tmp, split, pieces) for split in SPLITS}
        _merge_rejects(out, tmp / "rejects.jsonl", len(listed))
    manifest = {"splits": splits, "sources": [p["source"] for p in pieces],
                "rejected": sum(p["source"]["rejected"] for p in pieces), "rejects_file": "data/rejects.jsonl",
                "pieces": {split: _piece_list(cfg, pieces, split) for split in SPLITS},
                "reused_sources": len(reused), "ran_sources": len(ranks) - len(reused)}
    _check_outcome(cfg, manifest, out)
    return manifest


def task_count(cfg: RunConfig, run_dir: Path) -> int:
    """Tasks of this stage (one per source file): the world size of run_shard."""
    return len(source_files(cfg))


def pending_tasks(cfg: RunConfig, run_dir: Path) -> list[int]:
    """Tasks without a current marker: what a rerun (or a resubmitted job array) has to do."""
    listed = source_files(cfg)
    done = set(_current(RunDir(run_dir).stage("shard"), shard_unit_fingerprints(cfg, listed)))
    return [rank for rank in range(len(listed)) if rank not in done]


def _current(out: Path, expected: list[str]) -> list[int]:
    """Sources whose pieces are done with the fingerprint they would have now."""
    markers = [_read_marker(piece_dir(out, rank) / MARKER) for rank in range(len(expected))]
    return [rank for rank, (m, fp) in enumerate(zip(markers, expected)) if m and m["fingerprint"] == fp]


def _remove_stale_pieces(out: Path, count: int) -> None:
    """Pieces of sources no longer configured (the list got shorter)."""
    for folder in (out / "parts").glob("[0-9]*"):
        if int(folder.name) >= count:
            shutil.rmtree(folder)
    remove_stale_tmp(out / "parts")


def _piece_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"


def _piece_list(cfg: RunConfig, pieces: list[dict], split: str) -> list[dict[str, Any]]:
    """Shard-major, source-minor: the order of the rows in the merged shard files. Tokenize works
    (and caches) per piece, so a changed source re-tokenizes only its own pieces."""
    n = cfg.data.num_shards
    return [{"file": f"parts/{rank:05d}/{_piece_name(split, shard, n)}", "fingerprint": piece["fingerprint"],
             "rows": piece["splits"][split]["rows_per_shard"][shard]}
            for shard in range(n) for rank, piece in enumerate(pieces)]


def _merge_split(cfg: RunConfig, out: Path, target: Path, split: str, pieces: list[dict]) -> dict[str, Any]:
    n, schema = cfg.data.num_shards, shard_schema(cfg.data)
    counts = [sum(p["splits"][split]["rows_per_shard"][shard] for p in pieces) for shard in range(n)]
    for shard in range(n):
        with pq.ParquetWriter(target / _piece_name(split, shard, n), schema) as writer:
            for rank in range(len(pieces)):
                source = pq.ParquetFile(piece_dir(out, rank) / _piece_name(split, shard, n))
                for index in range(source.num_row_groups):  # one row group in memory at a time
                    writer.write_table(source.read_row_group(index))
    return {"rows": sum(counts), "files": [_piece_name(split, s, n) for s in range(n)], "rows_per_shard": counts}


def _merge_rejects(out: Path, target: Path, count: int) -> None:
    with open(target, "wb") as merged:
        for rank in range(count):
            with open(piece_dir(out, rank) / "rejects.jsonl", "rb") as part:
                shutil.copyfileobj(part, merged)


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
