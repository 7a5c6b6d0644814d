"""Stage 2: parquet shards -> tokenized Arrow files that training memory-maps.

Each shard is tokenized in batches and written as an Arrow IPC stream under a temporary name; its
stats file, written after the rename, is the shard's completion marker, so a killed run redoes
only the shards without one. Rows the encoder rejects (data.overlong: drop, or no answer tokens
left after truncation) go to a per-shard rejects file, merged into `tokenize/rejects.jsonl`.
What the columns hold: pipeline/encoding.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.context import StageContext
from pipeline.encoding import EncodedBatch, Encoder, output_schema
from pipeline.errors import UserError
from pipeline.models import load_tokenizer
from pipeline.run_dir import atomic_write_json, atomic_write_text, remove_stale_tmp

BATCH_ROWS = 1000
SPLITS = ("train", "eval")


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_shard(source: Path, target: Path, encoder: Encoder) -> dict[str, Any]:
    """Write `target` (Arrow IPC stream) from parquet `source` and the rows it rejected next to it
    (`NNNNN.rejects.jsonl`); return the shard's counts."""
    schema = encoder.schema
    stats = {"rows": 0, "tokens": 0, "targets": 0, "truncated": 0, "dropped": 0, "rejected": 0, "max_len": 0}
    tmp = target.with_name(f".{target.name}.tmp-w")
    rejects: list[str] = []
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=BATCH_ROWS):
            rows = batch.to_pydict()
            encoded = encoder(rows)
            writer.write_batch(pa.RecordBatch.from_pydict(encoded.columns, schema=schema))
            rejects += [_reject_line(source, rows, stats["rows"] + stats["rejected"], index, reason)
                        for index, reason in encoded.rejects]
            _count(stats, encoded)
    atomic_write_text(target.with_suffix(".rejects.jsonl"), "".join(rejects))
    tmp.replace(target)
    return stats


def _count(stats: dict[str, Any], encoded: EncodedBatch) -> None:
    lengths = [len(s) for s in encoded.columns["input_ids"]]
    stats["rows"] += len(lengths)
    stats["tokens"] += sum(lengths)
    stats["targets"] += sum(encoded.columns["num_targets"])
    stats["truncated"] += encoded.truncated
    stats["dropped"] += encoded.dropped
    stats["rejected"] += len(encoded.rejects)
    stats["max_len"] = max([stats["max_len"], *lengths])


def _reject_line(source: Path, rows: dict[str, list], done: int, index: int, reason: str) -> str:
    # `done` counts the shard's rows before this batch, so `index` becomes the row in the shard file.
    record = {"file": rows["source"][index], "line": rows["line"][index], "shard": source.name,
              "index": done + index, "reason": reason}
    return json.dumps(record, ensure_ascii=False) + "\n"


def run(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Tokenize every shard of every split that has no completion marker yet."""
    shard_manifest = ctx.run_dir.read_manifest("shard")
    assert shard_manifest is not None, "tokenize runs after shard"
    source_dir = ctx.run_dir.stage("shard") / "data"
    out = ctx.run_dir.stage("tokenize")
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    encoder = Encoder(tokenizer, cfg.data, chat_template(cfg, tokenizer))
    manifest: dict[str, Any] = {"splits": {}, "reused_shards": 0, "pad_token_id": pad_token_id(tokenizer),
                                "loss_on": cfg.data.loss_on}
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
    manifest["rejected"] = _merge_rejects(out)
    manifest["rejects_file"] = "rejects.jsonl"
    _check_rejects(cfg, shard_manifest, manifest, out)
    return manifest


def chat_template(cfg: RunConfig, tokenizer) -> str | None:
    """The data.chat_template file's text; for format chat, the tokenizer must have one otherwise."""
    if cfg.data.format != "chat":
        return None
    if cfg.data.chat_template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"data.chat_template: the tokenizer of {cfg.model.name_or_path!r} has no chat "
                            "template; set data.chat_template to a Jinja file")
        return None
    try:
        return Path(cfg.data.chat_template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.chat_template: cannot read {cfg.data.chat_template!r}: {err}") from None


def _merge_rejects(out: Path) -> int:
    """One rejects.jsonl for the stage, from the per-shard files (which survive a resumed run)."""
    lines = [line for split in SPLITS for path in sorted((out / split).glob("[0-9]*.rejects.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    atomic_write_text(out / "rejects.jsonl", "".join(lines))
    return len(lines)


def _check_rejects(cfg: RunConfig, shard_manifest: dict, manifest: dict, out: Path) -> None:
    """data.max_reject_fraction over shard and tokenize rejects together, before training starts."""
    where = out / "rejects.jsonl"
    if manifest["splits"]["train"]["rows"] == 0:
        raise UserError(f"data.train: no training rows left after tokenize ({manifest['rejected']} rejected, "
                        f"see {where})")
    total = sum(s["rows"] + s["rejected"] for s in shard_manifest["sources"])
    rejected = shard_manifest["rejected"] + manifest["rejected"]
    share = rejected / max(1, total)
    if share > cfg.data.max_reject_fraction:
        raise UserError(
            f"data: {rejected} of {total} rows rejected ({share:.1%} > data.max_reject_fraction "
            f"{cfg.data.max_reject_fraction:.1%}); see {where} and {out.parent / 'shard' / 'data' / 'rejects.jsonl'}")


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
    counts = {key: sum(s[key] for s in shards) for key in ("targets", "truncated", "dropped", "rejected")}
    return {"rows": rows, "tokens": tokens, **counts,
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
