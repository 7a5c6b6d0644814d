"""The tokenize stage's output format: its Arrow schema and the reader that train and evaluate use,
so that they depend on the file layout, not on how it is made."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipeline.errors import UserError
from pipeline.run_dir import damaged_file

REDO = "run `ftpipe run` again to redo that unit"


def output_schema(classification: bool, masked: bool = False) -> pa.Schema:
    """Columns of a tokenized (unpacked) split: packing adds its own (pipeline/packing.py)."""
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("num_targets", pa.int32())]
    if masked:
        fields.append(pa.field("loss_mask", pa.list_(pa.int8())))
    if classification:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


def open_split(folder: Path) -> pa.Table:
    """Memory-map a tokenized split: the rows stay on disk until a batch touches them. Each unit's
    file is checked against its marker first (size, checksum of its ends, rows): a file truncated,
    changed or deleted since is a one-line error naming it, and `ftpipe run` redoes that unit."""
    markers = sorted(folder.glob("[0-9]*.json"))
    orphans = sorted(set(folder.glob("[0-9]*.arrow")) - {marker.with_suffix(".arrow") for marker in markers})
    if orphans:
        raise UserError(f"{orphans[0]} has no marker (unfinished unit); {REDO}")
    tables = [_checked_unit(marker) for marker in markers]
    if not tables:
        return output_schema(False).empty_table()
    return pa.concat_tables(tables)


def _checked_unit(marker: Path) -> pa.Table:
    try:
        record = json.loads(marker.read_text())
        outputs = record["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{marker}: not a readable unit marker ({err}); {REDO}") from None
    damage = damaged_file(outputs, marker.parent, marker)
    if damage:
        raise UserError(f"{damage}; {REDO}")
    path = marker.with_suffix(".arrow")
    try:
        with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
            table = reader.read_all()
    except pa.ArrowException as err:
        raise UserError(f"{path}: unreadable ({err}); {REDO}") from None
    expected = record.get("packed_rows", record.get("rows"))
    if table.num_rows != expected:
        raise UserError(f"{path} holds {table.num_rows} rows, but {marker} vouches for {expected}; {REDO}")
    return table
