"""Reading a source's rows: jsonl / parquet / csv / txt files line by line, datasets batch by batch.

Every reader yields RawRow: the row as a dict (or why it cannot be read) and its 1-based line (the
row number for parquet and datasets), which rejects.jsonl and the shard rows record.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.formats import has_surrogates
from pipeline.hf_sources import dataset_batches
from pipeline.sources import SourceFile, columns_read

BATCH_ROWS = 2048


def read_source(source: SourceFile, data: DataConfig) -> Iterator[RawRow]:
    """Every row of a file or dataset source, in order."""
    if source.dataset is not None:
        return _rows_of(dataset_batches(source.dataset, columns_read(data), BATCH_ROWS))
    return read_rows(source.path, data.text_field)


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
        except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
            yield RawRow(number, None, "a number with too many digits", text)
            continue
        except RecursionError:
            yield RawRow(number, None, "nested too deeply", text)
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
        while True:
            first = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # a field over csv.field_size_limit(): reject it, read on
                yield RawRow(first, None, f"unreadable CSV row: {err}")
                continue
            number = reader.line_num
            values = [v for v in row.values() if isinstance(v, str)]
            if any(has_surrogates(v) for v in values):
                yield RawRow(number, None, "invalid UTF-8")
            elif None in row:
                yield RawRow(number, None, "more fields than the header")
            else:
                yield RawRow(number, dict(row), raw=delimiter.join(values))


def _read_parquet(path: Path) -> Iterator[RawRow]:
    return _rows_of(pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS))


def _rows_of(batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[RawRow]:
    """Rows of Arrow batches, a batch in memory at a time, numbered from 1."""
    number = 0
    for batch in batches:
        try:
            rows: list[dict | None] = batch.to_pylist()
        except UnicodeDecodeError:
            rows = _decode_rows_one_by_one(batch)
        for row in rows:
            number += 1
            yield RawRow(number, row) if row is not None else RawRow(number, None, "invalid UTF-8")


def _decode_rows_one_by_one(batch: pa.RecordBatch | pa.Table) -> list[dict | None]:
    """Some writers put invalid UTF-8 in string columns; reject those rows, keep the others."""
    as_binary = type(batch).from_arrays(
        [c.cast(pa.binary()) if pa.types.is_string(c.type) else c for c in batch.columns],
        names=batch.schema.names)
    rows: list[dict | None] = []
    for row in as_binary.to_pylist():
        try:
            rows.append({k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in row.items()})
        except UnicodeDecodeError:
            rows.append(None)
    return rows
