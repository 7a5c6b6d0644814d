"""The tokenize stage's output format: its Arrow schema and the reader that train and evaluate use,
so that they depend on the file layout, not on how it is made."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def output_schema(classification: bool, masked: bool = False) -> pa.Schema:
    """Columns of a tokenized (unpacked) split: packing adds its own (pipeline/packing.py)."""
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("num_targets", pa.int32())]
    if masked:
        fields.append(pa.field("loss_mask", pa.list_(pa.int8())))
    if classification:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


def open_split(folder: Path) -> pa.Table:
    """Memory-map a tokenized split: the rows stay on disk until a batch touches them."""
    tables = []
    for path in sorted(folder.glob("[0-9]*.arrow")):
        with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
            tables.append(reader.read_all())
    if not tables:
        return output_schema(False).empty_table()
    return pa.concat_tables(tables)
