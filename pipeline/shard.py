"""Stage 1: read raw sources, validate every row, split train/eval by a stable hash, write shards.

Rows stream from the sources to per-shard parquet writers in small batches, so memory does not
grow with the data. Rejected rows go to rejects.jsonl with file, line and reason. Each source file
(or dataset split) is one task (data.num_workers run in parallel) that writes its own piece of every
shard; the pieces are cached per source and merged, in source order, into the shard files.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.digests import DigestCache, fingerprint
from pipeline.errors import UserError
from pipeline.formats import RowValidator, shard_schema
from pipeline.labels import shard_labels
from pipeline.readers import RawRow, read_source
from pipeline.run_dir import RunDir, atomic_dir
from pipeline.sources import SourceFile, source_digest, source_files, source_key
from pipeline.stages import NOT_SHARD_KEYS, STAGES
from pipeline.units import check_rejects, merge_rejects, run_units

FLUSH_ROWS = 2048
MARKER = "done.json"


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

    def __init__(self, cfg: RunConfig, folder: Path, rejects: io.TextIOBase, labels: list[str] | None = None):
        self.data = cfg.data
        self.validate = RowValidator(cfg.data, cfg.model.num_labels, labels)
        schema = shard_schema(cfg.data)
        self.writers = {s: SplitWriter(folder, s, cfg.data.num_shards, schema) for s in ("train", "eval")}
        self.rejects = rejects
        self.sources: list[dict[str, Any]] = []

    def add_file(self, source: SourceFile) -> None:
        try:
            self._add_rows(source)
        except (OSError, pa.ArrowException) as err:  # a file that cannot be opened or whose container broke
            raise UserError(f"{source_key(source)}: {source.name}: cannot read: "
                            f"{str(err).splitlines()[0]}") from None

    def _add_rows(self, source: SourceFile) -> None:
        kept = rejected = train_rows = 0
        for item in read_source(source, self.data):
            if source.limit is not None and kept >= source.limit:
                break
            row, problem = self.validate(item.row) if item.row is not None else (None, item.error)
            if row is None:
                rejected += 1
                self._reject(source.name, item, problem)
                continue
            kept += 1
            train_rows += self._route(row, source, item.line)
        self.sources.append({"path": source.name, "rows": kept, "rejected": rejected, "weight": source.weight,
                             "limit": source.limit, "train_copies": train_rows}
                            | ({"dataset": source.dataset.record()} if source.dataset else {}))

    def _route(self, row: dict[str, Any], source: SourceFile, line: int) -> int:
        """Write the row to its split and shard (training rows `weight` times); return train copies."""
        digest = row_hash(row)
        held_out = source.held_out
        if held_out is None:
            held_out = int.from_bytes(digest[:8], "big") / 2**64 < self.data.eval_fraction
        shard = int.from_bytes(digest[8:], "big") % self.data.num_shards
        record = {**row, "source": source.name, "line": line}
        times = 1 if held_out else copies(digest, source.weight)
        for _ in range(times):
            self.writers["eval" if held_out else "train"].add(shard, record)
        return 0 if held_out else times

    def _reject(self, name: str, item: RawRow, reason: str | None) -> None:
        record = {"file": name, "line": item.line, "reason": reason, "row": item.raw[:500]}
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish(self) -> dict[str, Any]:
        return {split: writer.close() for split, writer in self.writers.items()}


SPLITS = ("train", "eval")


def shard_unit_fingerprints(cfg: RunConfig, sources: list[SourceFile], digests: list[Any],
                            labels: list[str] | None) -> list[str]:
    """One per source: what its shard pieces depend on (its content and settings, the label names,
    not the other sources)."""
    base = {"data": cfg.data.model_dump(exclude=NOT_SHARD_KEYS | {"train", "eval"}), "labels": labels,
            "num_labels": cfg.model.num_labels, "version": STAGES["shard"].version}
    return [fingerprint({**base, "file": s.name, "digest": digest, "held_out": s.held_out,
                         "weight": s.weight, "limit": s.limit}) for s, digest in zip(sources, digests)]


@dataclass(frozen=True)
class Piece:
    """The unit: one source file's piece of every shard of both splits, in `parts/NNNNN/`."""

    index: int
    folder: Path  # parts/
    source: SourceFile
    fingerprint: str
    labels: tuple[str, ...] | None = None  # classification: the names rows map to ids by

    @property
    def home(self) -> Path:
        return self.folder / f"{self.index:05d}"

    @property
    def marker(self) -> Path:
        return self.home / MARKER

    @property
    def rejects(self) -> Path:
        return self.home / "rejects.jsonl"

    @property
    def outputs(self) -> list[Path]:
        return sorted(path for path in self.home.iterdir() if path.name != MARKER)


class ShardUnits:
    """The stage's units (a pipeline.units.UnitStage), one per source file."""

    name = "shard"

    def task_count(self, cfg: RunConfig, run_dir: RunDir) -> int:
        return len(source_files(cfg))

    def ready(self, cfg: RunConfig, run_dir: RunDir) -> bool:
        return True

    def units(self, cfg: RunConfig, run_dir: RunDir) -> list[Piece]:
        listed = source_files(cfg)
        parts = run_dir.stage(self.name) / "parts"
        cache = DigestCache.of(cfg.output_dir)
        digests = [source_digest(source, cfg.data, cache) for source in listed]
        labels = shard_labels(cfg, run_dir, listed, digests)
        prints = shard_unit_fingerprints(cfg, listed, digests, labels)
        names = tuple(labels) if labels is not None else None
        return [Piece(rank, parts, source, fp, names)
                for rank, (source, fp) in enumerate(zip(listed, prints))]

    def work(self, cfg: RunConfig, run_dir: RunDir, unit: Piece) -> dict[str, Any]:
        """That file's piece of every shard of both splits and its rejects."""
        with atomic_dir(unit.home) as tmp, open(tmp / unit.rejects.name, "w", encoding="utf-8") as rejects:
            sharder = Sharder(cfg, tmp, rejects, list(unit.labels) if unit.labels is not None else None)
            sharder.add_file(unit.source)
            result = {"source": sharder.sources[0], "splits": sharder.finish()}
        return result


UNITS = ShardUnits()


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Shard the configured sources into `<run>/shard/data/{train,eval}-*.parquet`.

    Map: one task per source file writes that file's rows, routed by hash, into its own piece of
    every shard (`parts/NNNNN/`), reused while the file, the shard keys and the code are unchanged.
    Merge: each shard file is its pieces in source order, i.e. the rows a single pass would write.
    """
    out = ctx.run_dir.stage("shard")
    done = run_units(UNITS, cfg, ctx.run_dir, cfg.data.num_workers)
    pieces, homes = done.records, [unit.home for unit in done.units]
    with atomic_dir(out / "data") as tmp:
        splits = {split: _merge_split(cfg, homes, tmp, split, pieces) for split in SPLITS}
        merge_rejects(done.units, tmp / "rejects.jsonl")
    manifest = {"splits": splits, "sources": [p["source"] for p in pieces],
                "rejected": sum(p["source"]["rejected"] for p in pieces),
                "rejects_file": "data/rejects.jsonl",
                "pieces": {split: _piece_list(cfg, [h.relative_to(out) for h in homes], pieces, split)
                           for split in SPLITS},
                "reused_sources": len(pieces) - done.ran, "ran_sources": done.ran,
                # classification: names in id order (data.labels or inferred); consolidate reads them
                "labels": list(done.units[0].labels) if done.units[0].labels is not None else None}
    kept = sum(s["rows"] for s in manifest["sources"])
    check_rejects(cfg, splits["train"]["rows"], kept + manifest["rejected"], [manifest["rejected"]],
                  [out / "data" / "rejects.jsonl"], "no valid training rows")
    return manifest


def _piece_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"


def _piece_list(cfg: RunConfig, homes: list[Path], pieces: list[dict], split: str) -> list[dict[str, Any]]:
    """Shard-major, source-minor: the order of the rows in the merged shard files. Tokenize works
    (and caches) per piece, so a changed source re-tokenizes only its own pieces."""
    n = cfg.data.num_shards
    return [{"file": (home / _piece_name(split, shard, n)).as_posix(), "fingerprint": piece["fingerprint"],
             "rows": piece["splits"][split]["rows_per_shard"][shard]}
            for shard in range(n) for home, piece in zip(homes, pieces)]


def _merge_split(cfg: RunConfig, homes: list[Path], target: Path, split: str,
                 pieces: list[dict]) -> dict[str, Any]:
    n, schema = cfg.data.num_shards, shard_schema(cfg.data)
    counts = [sum(p["splits"][split]["rows_per_shard"][shard] for p in pieces) for shard in range(n)]
    for shard in range(n):
        with pq.ParquetWriter(target / _piece_name(split, shard, n), schema) as writer:
            for home in homes:
                source = pq.ParquetFile(home / _piece_name(split, shard, n))
                for index in range(source.num_row_groups):  # one row group in memory at a time
                    writer.write_table(source.read_row_group(index))
    return {"rows": sum(counts), "files": [_piece_name(split, s, n) for s in range(n)],
            "rows_per_shard": counts}
