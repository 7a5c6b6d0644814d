"""data.packing: several tokenized examples per row of at most data.max_seq_len tokens.

Packing is streaming first-fit over a bounded window of open rows, in the order examples come:
an example goes into the first open row it fits in, else opens a new row; when more than
OPEN_ROWS rows are open the oldest is written out. Memory stays bounded whatever the shard size,
and a row is closed as soon as it is full.

A packed row stores the concatenated `input_ids` (and `loss_mask`), the example lengths in
`seq_lens`, and `num_targets`, the sum of its examples' targets. Each example's first token is
never a target (encoding.py), so no target is predicted across an example boundary; training
batches restart position_ids and block attention at every boundary (train/data.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import DataConfig

OPEN_ROWS = 64  # rows that may still take examples: more fill rows better, at more memory (64 x
# max_seq_len token ids). 256-token rows of short chat lines: 16 open rows 97.2% full, 64 98.5%.


def packed_schema(schema: pa.Schema) -> pa.Schema:
    """The unpacked schema plus the example lengths of each row."""
    return schema.append(pa.field("seq_lens", pa.list_(pa.int32())))


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    targets: int = 0


class Packer:
    """Feed it encoded columns batch by batch; it returns the packed rows closed so far."""

    def __init__(self, max_len: int, masked: bool, open_rows: int = OPEN_ROWS):
        self.max_len = max_len
        self.masked = masked
        self.open_rows = open_rows
        self.rows = 0  # packed rows written
        self._open: list[_Row] = []
        self._closed: list[_Row] = []

    def add(self, columns: dict[str, list]) -> dict[str, list]:
        masks = columns["loss_mask"] if self.masked else [None] * len(columns["input_ids"])
        for ids, mask, targets in zip(columns["input_ids"], masks, columns["num_targets"]):
            self._place(ids, mask, targets)
        return self._take_closed()

    def finish(self) -> dict[str, list]:
        self._closed += self._open
        self._open = []
        return self._take_closed()

    def _place(self, ids: list[int], mask: list[int] | None, targets: int) -> None:
        assert 0 < len(ids) <= self.max_len, "the encoder applies data.overlong before packing"
        row = next((r for r in self._open if len(r.ids) + len(ids) <= self.max_len), None)
        if row is None:
            row = _Row()
            self._open.append(row)
        row.ids += ids
        row.mask += mask if mask is not None else []
        row.lens.append(len(ids))
        row.targets += targets
        if len(row.ids) == self.max_len:
            self._close(row)
        elif len(self._open) > self.open_rows:
            self._close(self._open[0])

    def _close(self, row: _Row) -> None:
        self._open.remove(row)
        self._closed.append(row)

    def _take_closed(self) -> dict[str, list]:
        rows, self._closed = self._closed, []
        self.rows += len(rows)
        columns: dict[str, list] = {"input_ids": [r.ids for r in rows],
                                    "num_targets": [r.targets for r in rows]}
        if self.masked:
            columns["loss_mask"] = [r.mask for r in rows]
        columns["seq_lens"] = [r.lens for r in rows]
        return columns


def packing_summary(shards: list[dict[str, Any]], data: DataConfig) -> dict[str, Any]:
    """Manifest figures of a packed split: efficiency = real tokens / (packed rows x max_seq_len)."""
    if not data.packing:
        return {}
    packed = sum(s["packed_rows"] for s in shards)
    examples = sum(s["rows"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    return {"packed_rows": packed, "examples_per_row": examples / packed if packed else 0.0,
            "packing_efficiency": tokens / (packed * data.max_seq_len) if packed else 0.0}
