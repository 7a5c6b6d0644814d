"""Resumable, world-size-independent batches from a memory-mapped tokenized split.

The data position is a global sample offset into an endless stream made of one seeded
permutation per epoch: a step starting at offset o consumes positions [o, o + G) for a global
batch of G. Each rank takes its slice of every micro-batch, so a checkpoint's offset means the
same next sample at any world size or batch layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.train.tiled_attention import tile_layout, tile_work


class SampleOrder:
    """Maps global sample positions to row indices: a fresh seeded permutation per epoch."""

    def __init__(self, num_rows: int, seed: int):
        assert num_rows > 0
        self.num_rows = num_rows
        self.seed = seed
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._cached  # read once: the prefetch thread may replace it meanwhile
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows))
            self._cached = cached
        return cached[1]

    def rows(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // self.num_rows):
            mask = positions // self.num_rows == epoch
            out[mask] = self.permutation(int(epoch))[positions[mask] % self.num_rows]
        return out


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def micro_start(self, offset: int, micro: int, rank: int) -> int:
        per_micro = self.micro_batch_size * self.world_size
        return offset + micro * per_micro + rank * self.micro_batch_size


def batch_layout(cfg: TrainConfig, world_size: int) -> BatchLayout:
    """The layout for this world size; global_batch_size, when set, fixes the global batch."""
    if cfg.global_batch_size is None:
        return BatchLayout(cfg.micro_batch_size, cfg.grad_accum, world_size)
    per_micro = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_micro:
        raise UserError(f"train.global_batch_size: {cfg.global_batch_size} is not a multiple of "
                        f"micro_batch_size x ranks = {cfg.micro_batch_size} x {world_size}")
    return BatchLayout(cfg.micro_batch_size, cfg.global_batch_size // per_micro, world_size)


class BatchSource(Protocol):
    """Where the loop reads micro-batches: TrainBatches, or a Prefetcher collating ahead of it."""

    @property
    def layout(self) -> BatchLayout: ...

    def global_targets(self, offset: int) -> int: ...

    def micro_batch(self, offset: int, micro: int, rank: int) -> dict[str, torch.Tensor]: ...


class TrainBatches:
    """Builds padded micro-batches for one rank and the global target count for a step."""

    def __init__(self, table: pa.Table, layout: BatchLayout, seed: int, pad_id: int, join_rows: bool = False):
        self.table = table
        self.layout = layout
        self.order = SampleOrder(table.num_rows, seed)
        self.pad_id = pad_id
        self.join_rows = join_rows  # packed rows as one row (see collate_table)
        self.num_targets = table.column("num_targets").to_numpy()

    def global_targets(self, offset: int) -> int:
        """Targets (tokens or examples) in the global batch at `offset`: the loss denominator."""
        rows = self.order.rows(offset, self.layout.global_batch)
        return int(self.num_targets[rows].sum())

    def rows_for(self, offset: int, micro: int, rank: int) -> np.ndarray:
        start = self.layout.micro_start(offset, micro, rank)
        return self.order.rows(start, self.layout.micro_batch_size)

    def micro_batch(self, offset: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        rows = self.rows_for(offset, micro, rank)
        batch = collate_table(self.table.take(pa.array(rows)), self.pad_id, self.join_rows)
        batch["rows"] = torch.from_numpy(rows)  # a sample is a row, packed or not
        return batch


def collate_table(table: pa.Table, pad_id: int, join_rows: bool = False) -> dict[str, Any]:
    """A batch from tokenized rows, whichever optional columns (loss_mask, seq_lens, label) they have,
    built from the Arrow buffers with numpy: no Python work per token or per row.

    join_rows: packed rows become one row of all their tokens, without the padding that rounds each up
    to the longest (about 2% of a micro-batch of short chat lines), where the attention scores it in
    tiles (train/tiled_attention.py); flash kernels read the same examples from cu_seq_lens. Only
    where the joined row's tiles would score at most half the keys of the rows' own L x L masks: rows
    of long examples stay rows."""
    columns = {name: ragged_column(table.column(name)) if name in table.column_names else None
               for name in ("input_ids", "loss_mask", "seq_lens")}
    batch = _joined(columns, pad_id) if join_rows and columns["seq_lens"] is not None else None
    if batch is None:
        batch = collate_ragged(columns["input_ids"], pad_id, columns["loss_mask"], columns["seq_lens"])
    if "label" in table.column_names:
        batch["labels"] = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    return batch


def _joined(columns: dict[str, Ragged | None], pad_id: int) -> dict[str, Any] | None:
    """The packed rows as one row, or None where its tiles would not pay (see collate_table)."""
    joined = {name: None if column is None else Ragged(column.values, np.array([column.values.size]))
              for name, column in columns.items()}
    batch = collate_ragged(joined["input_ids"], pad_id, joined["loss_mask"], joined["seq_lens"])
    lengths = columns["input_ids"].lengths
    masked = len(lengths) * int(lengths.max()) ** 2  # what the rows' masks would score
    classes = batch.get("tile_classes")
    return batch if classes is not None and 2 * tile_work(classes) <= masked else None


def collate(sequences: list[list[int]], pad_id: int, masks: list[list[int]] | None = None,
            seq_lens: list[list[int]] | None = None) -> dict[str, Any]:
    """collate_ragged of Python lists (verification rows, tests)."""
    def ragged(rows: list[list[int]] | None) -> Ragged | None:
        return None if rows is None else ragged_column(pa.array(rows, type=pa.list_(pa.int64())))

    return collate_ragged(ragged(sequences), pad_id, ragged(masks), ragged(seq_lens))


@dataclass(frozen=True)
class Ragged:
    """A list column as its flat values and the length of each row."""
    values: np.ndarray
    lengths: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.lengths)), self.lengths)

    @property
    def columns(self) -> np.ndarray:
        """Each value's index within its row."""
        starts = np.cumsum(self.lengths) - self.lengths
        return np.arange(len(self.values)) - np.repeat(starts, self.lengths)


def ragged_column(column: pa.Array | pa.ChunkedArray) -> Ragged:
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    return Ragged(pc.list_flatten(column).to_numpy(), lengths)


def collate_ragged(ids: Ragged, pad_id: int, masks: Ragged | None = None,
                   seq_lens: Ragged | None = None) -> dict[str, Any]:
    """Right-pad to the longest sequence; labels are the ids with padding ignored (-100), and with
    every token whose loss mask is 0 ignored too when masks (tokenize's `loss_mask`) are given.
    Packed rows (`seq_lens`, the example lengths of each row) also get the position_ids (and flash
    kernels' boundaries) that keep every example to itself: see packed_inputs."""
    shape = (len(ids.lengths), int(ids.lengths.max()))
    where = (ids.rows, ids.columns)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    tokens[where] = ids.values
    mask = np.zeros(shape, dtype=np.int64)
    mask[where] = 1
    counted = np.zeros(shape, dtype=bool)
    counted[where] = masks.values.astype(bool) if masks is not None else True
    batch: dict[str, Any] = {"input_ids": torch.from_numpy(tokens), "attention_mask": torch.from_numpy(mask)}
    if seq_lens is not None:
        batch.update(packed_inputs(seq_lens, shape[1]))
        counted &= ~batch.pop("example_start").numpy()
    batch["labels"] = torch.from_numpy(np.where(counted, tokens, -100))
    return batch


def packed_inputs(seq_lens: Ragged, width: int) -> dict[str, Any]:
    """position_ids that restart at 0 for every example: with no attention_mask and no cache,
    transformers finds the examples from them and builds each backend's own block-diagonal causal mask
    (sdpa/eager: still L x L, per forward; flash: none). Padding positions are all 0, so each padding
    token is an example of its own. Flash kernels read `cu_seq_lens` (example boundaries in the
    flattened batch, a row's padding one more segment) and `max_length` (an int: no device sync);
    tiled sdpa its tiles' layout (train/tiled_attention.py).
    `example_start` marks each example's first token, which must not be the target of the previous
    example's last one."""
    lens = seq_lens.values.astype(np.int64)
    per_row = np.bincount(seq_lens.rows, lens, len(seq_lens.lengths)).astype(np.int64)
    examples = Ragged(np.repeat(lens, lens), per_row)  # the examples' tokens, as laid out in the rows
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # position in its example
    positions = np.zeros((len(seq_lens.lengths), width), dtype=np.int64)
    positions[examples.rows, examples.columns] = within
    start = np.zeros_like(positions, dtype=bool)
    start[examples.rows, examples.columns] = within == 0
    padding = width - examples.lengths
    ends = np.cumsum(seq_lens.lengths)  # a row's padding segment follows its last example
    segments = np.insert(lens, ends[padding > 0], padding[padding > 0])
    cu_seq_lens = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
    return {"position_ids": torch.from_numpy(positions), "example_start": torch.from_numpy(start),
            "cu_seq_lens": torch.from_numpy(cu_seq_lens), "max_length": int(segments.max()),
            **tile_layout(positions)}
