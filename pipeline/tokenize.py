"""Stage 2: parquet shards -> tokenized Arrow files that training memory-maps.

The unit of work is a shard piece (the rows of one source file in one shard, see pipeline/shard.py):
each is tokenized in batches and written as an Arrow IPC stream under a temporary name; its stats
file, written after the rename and holding the unit's fingerprint (its piece, the tokenizer, the
tokenize keys, the code), is its completion marker, so a killed or changed run redoes only the
units without a current one. data.num_workers workers run the units in parallel (threads for a
Rust tokenizer, else processes). Rows the encoder rejects (data.overlong: drop, or no answer
tokens left after truncation) go to a per-shard rejects file, merged into `tokenize/rejects.jsonl`.
What the columns hold: pipeline/encoding.py.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.digests import DigestCache, fingerprint, model_digest
from pipeline.encoding import EncodedBatch, Encoder
from pipeline.packing import Packer, packed_schema, packing_summary
from pipeline.run_dir import RunDir, atomic_write_text, room_for
from pipeline.sources import source_files
from pipeline.stages import STAGES, tokenize_inputs
from pipeline.tokenizer import chat_template, load_tokenizer, rust_tokenizer, saved_tokenizer
from pipeline.units import check_rejects, merge_rejects, run_units

BATCH_ROWS = 1000
# About how many bytes of Arrow a byte of a shard piece's uncompressed parquet makes (measured on
# English text with a BPE tokenizer); only for saying how much space a full disk lacks.
ARROW_PER_PARQUET_BYTE = 2
SPLITS = ("train", "eval")
SAVED_TOKENIZERS = ".tokenizers"  # in output_dir, beside .digest-cache.json: shared by its runs


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_shard(source: Path, target: Path, encoder: Encoder) -> dict[str, Any]:
    """Write `target` (Arrow IPC stream) from parquet `source` and the rows it rejected next to it
    (`NNNNN.rejects.jsonl`); return the shard's counts."""
    packer = Packer(encoder.max_len, encoder.masked) if encoder.data.packing else None
    schema = packed_schema(encoder.schema) if packer else encoder.schema
    stats = {"rows": 0, "tokens": 0, "targets": 0, "truncated": 0, "dropped": 0, "rejected": 0, "max_len": 0}
    # A name of its own: a fixed one would be written and renamed away by another writer of this unit.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    rejects: list[str] = []
    try:
        _write_stream(source, tmp, encoder, packer, schema, stats, rejects)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back
        raise
    atomic_write_text(target.with_suffix(".rejects.jsonl"), "".join(rejects))
    tmp.replace(target)
    return stats


def _write_stream(source: Path, tmp: Path, encoder: Encoder, packer: Packer | None, schema: pa.Schema,
                  stats: dict[str, Any], rejects: list[str]) -> None:
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS):
            rows = ColumnsOnDemand(batch)
            encoded = encoder(rows)
            columns = packer.add(encoded.columns) if packer else encoded.columns
            writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
            rejects += [_reject_line(source, rows, stats["rows"] + stats["rejected"], index, reason)
                        for index, reason in encoded.rejects]
            _count(stats, encoded)
        if packer:  # stats count examples; packed_rows counts the rows training samples
            writer.write_batch(pa.RecordBatch.from_pydict(packer.finish(), schema=schema))
            stats["packed_rows"] = packer.rows


class ColumnsOnDemand(Mapping):
    """A record batch's columns as Python lists, converted when first read: most batches never need
    their source and line columns (only rejects do)."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch, self.converted = batch, {}

    def __getitem__(self, name: str) -> list:
        if name not in self.converted:
            if self.batch.schema.get_field_index(name) < 0:
                raise KeyError(name)
            self.converted[name] = self.batch.column(name).to_pylist()
        return self.converted[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.batch.schema.names)

    def __len__(self) -> int:
        return len(self.batch.schema.names)


def _count(stats: dict[str, Any], encoded: EncodedBatch) -> None:
    ids = encoded.columns["input_ids"]
    lengths = pc.list_value_length(ids).to_pylist() if isinstance(ids, pa.Array) else [len(s) for s in ids]
    stats["rows"] += len(lengths)
    stats["tokens"] += sum(lengths)
    stats["targets"] += pc.sum(encoded.columns["num_targets"]).as_py() or 0
    stats["truncated"] += encoded.truncated
    stats["dropped"] += encoded.dropped
    stats["rejected"] += len(encoded.rejects)
    stats["max_len"] = max([stats["max_len"], *lengths])


def _reject_line(source: Path, rows: dict[str, list], done: int, index: int, reason: str) -> str:
    # `done` counts the shard's rows before this batch, so `index` becomes the row in the shard file.
    record = {"file": rows["source"][index], "line": rows["line"][index], "shard": source.name,
              "index": done + index, "reason": reason}
    return json.dumps(record, ensure_ascii=False) + "\n"


def tokenize_unit_fingerprints(cfg: RunConfig, piece_fingerprints: list[str]) -> list[str]:
    """One per shard piece: the piece's own fingerprint, the tokenizer, the tokenize keys and version."""
    base = {"config": tokenize_inputs(cfg, DigestCache.of(cfg.output_dir)),
            "version": STAGES["tokenize"].version}
    return [fingerprint({**base, "piece": piece}) for piece in piece_fingerprints]


@dataclass(frozen=True)
class Unit:
    """One piece of one shard (the rows of one source file in it): the unit of work and of caching."""

    split: str
    index: int  # NNNNN of its output files; shard-major, source-minor, so sorted files keep row order
    source: Path
    fingerprint: str
    folder: Path  # tokenize/<split>/

    @property
    def marker(self) -> Path:
        """Its stats, with the fingerprint."""
        return self.folder / f"{self.index:05d}.json"

    @property
    def rejects(self) -> Path:
        return self.folder / f"{self.index:05d}.rejects.jsonl"

    @property
    def arrow(self) -> Path:
        return self.folder / f"{self.index:05d}.arrow"

    @property
    def outputs(self) -> list[Path]:
        return [self.arrow, self.rejects]


def units(cfg: RunConfig, run_dir: RunDir) -> list[Unit]:
    """Every unit of both splits, from the shard manifest; rank r of a task is units(...)[r]."""
    pieces = run_dir.read_manifest("shard")["pieces"]
    listed = [(split, i, piece) for split in SPLITS for i, piece in enumerate(pieces[split])]
    prints = tokenize_unit_fingerprints(cfg, [piece["fingerprint"] for _, _, piece in listed])
    out = run_dir.stage("tokenize")
    return [Unit(split, i, run_dir.stage("shard") / piece["file"], fp, out / split)
            for (split, i, piece), fp in zip(listed, prints)]


_ENCODERS: dict[tuple, Encoder] = {}
_TOKENIZERS: dict[tuple, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def shared_tokenizer(cfg: RunConfig) -> tuple[tuple, Any]:
    """This process's tokenizer for the stage and its identity, loaded once; read it, never change
    its settings. Local tokenizers come from their saved Rust copy (see pipeline.tokenizer), except
    for chat, whose templates render through transformers."""
    path = cfg.model.name_or_path
    key = (path, cfg.data.format == "chat", _saved_name(cfg))
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS.clear()
            local = Path(path).is_dir() and cfg.data.format != "chat"
            _TOKENIZERS[key] = saved_tokenizer(path, Path(cfg.output_dir) / SAVED_TOKENIZERS, key[-1]) \
                if local else load_tokenizer(path)
        return key, _TOKENIZERS[key]


# What turns a model folder into a Rust tokenizer (the last three convert folders without tokenizer.json).
TOKENIZER_LIBRARIES = ("transformers", "tokenizers", "sentencepiece", "protobuf", "tiktoken")


def _saved_name(cfg: RunConfig) -> str:
    """Names a saved tokenizer by what it is built from: the files' content and the libraries."""
    files = model_digest(cfg.model.name_or_path, DigestCache.of(cfg.output_dir), weights=False)
    return fingerprint({"files": files, "version": STAGES["tokenize"].version,
                        "libraries": [_installed(name) for name in TOKENIZER_LIBRARIES]})


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _encoder(cfg: RunConfig) -> Encoder:
    """One encoder per worker (process or thread: a tokenizer's settings are not thread-safe), made by
    its first task from a copy of the shared tokenizer (a fraction of the time of a load)."""
    key, shared = shared_tokenizer(cfg)
    worker_key = (cfg.model_dump_json(), threading.get_ident(), key)
    if worker_key not in _ENCODERS:
        tokenizer = copy.deepcopy(shared)
        _ENCODERS[worker_key] = Encoder(tokenizer, cfg.data, chat_template(cfg, tokenizer))
    return _ENCODERS[worker_key]


class TokenizeUnits:
    """The stage's units (a pipeline.units.UnitStage), one per shard piece."""

    name = "tokenize"

    def task_count(self, cfg: RunConfig, run_dir: RunDir) -> int:
        """One per shard piece (split x shard x source file), known before shard ran."""
        return len(SPLITS) * cfg.data.num_shards * len(source_files(cfg))

    def ready(self, cfg: RunConfig, run_dir: RunDir) -> bool:
        return run_dir.read_manifest("shard") is not None

    def units(self, cfg: RunConfig, run_dir: RunDir) -> list[Unit]:
        return units(cfg, run_dir)

    def work(self, cfg: RunConfig, run_dir: RunDir, unit: Unit) -> dict[str, Any]:
        # A SLURM array task may run before the stage's own job has made the folder.
        unit.folder.mkdir(parents=True, exist_ok=True)
        with room_for(unit.arrow, lambda: ARROW_PER_PARQUET_BYTE * _uncompressed_bytes(unit.source)):
            stats = tokenize_shard(unit.source, unit.arrow, _encoder(cfg))
        return {**stats, "file": unit.arrow.name}


UNITS = TokenizeUnits()


def _uncompressed_bytes(piece: Path) -> int:
    metadata = pq.ParquetFile(piece).metadata
    return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Tokenize every shard piece whose completion marker is missing or from other inputs."""
    shard_manifest = ctx.run_dir.read_manifest("shard")
    assert shard_manifest is not None, "tokenize runs after shard"
    out = ctx.run_dir.stage("tokenize")
    tokenizer = shared_tokenizer(cfg)[1]
    chat_template(cfg, tokenizer)  # a missing template is a config error: raise it before any worker starts
    # A Rust tokenizer releases the GIL: threads then beat processes (no start-up, no copies, and
    # one thread's Python work overlaps another's Rust). Chat templates render in Python: processes.
    threads = cfg.data.format != "chat" and rust_tokenizer(tokenizer) is not None
    done = run_units(UNITS, cfg, ctx.run_dir, cfg.data.num_workers, threads)
    manifest: dict[str, Any] = {"splits": {}, "reused_shards": len(done.units) - done.ran,
                                "ran_shards": done.ran, "pad_token_id": pad_token_id(tokenizer),
                                "loss_on": cfg.data.loss_on}
    for split in SPLITS:
        shards = [record for unit, record in zip(done.units, done.records) if unit.split == split]
        manifest["splits"][split] = _summarize(shards)
        manifest["splits"][split].update(packing_summary(shards, cfg.data))
    manifest["rejected"] = merge_rejects(done.units, out / "rejects.jsonl")
    manifest["rejects_file"] = "rejects.jsonl"
    # Over shard and tokenize rejects together, of every row the sources held.
    total = sum(s["rows"] + s["rejected"] for s in shard_manifest["sources"])
    check_rejects(cfg, manifest["splits"]["train"]["rows"], total,
                  [manifest["rejected"], shard_manifest["rejected"]],
                  [out / "rejects.jsonl", ctx.run_dir.stage("shard") / shard_manifest["rejects_file"]],
                  "no training rows left after tokenize")
    return manifest


def _summarize(shards: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(s["rows"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    counts = {key: sum(s[key] for s in shards) for key in ("targets", "truncated", "dropped", "rejected")}
    return {"rows": rows, "tokens": tokens, **counts,
            "max_len": max((s["max_len"] for s in shards), default=0),
            "mean_len": tokens / rows if rows else 0.0, "files": [s["file"] for s in shards]}
