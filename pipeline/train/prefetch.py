"""The next micro-batches collated on a background thread while the current one computes.

Batches are a pure function of (global sample offset, micro-batch, rank), so prefetching changes no
position: the loop still counts, records in the ledger and checkpoints the rows of the batches it
trained, and a batch prefetched but never trained (the run stops, or resumes elsewhere) is dropped.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pipeline.train.data import BatchLayout, TrainBatches

AHEAD = 2  # micro-batches collated ahead: one step's worth or two is enough to hide collate


class Prefetcher:
    """TrainBatches for one rank, with the micro-batches that follow each one it hands out collated
    ahead on one worker thread (at most AHEAD waiting)."""

    def __init__(self, batches: TrainBatches, rank: int, ahead: int = AHEAD):
        self.batches, self.rank, self.ahead = batches, rank, ahead
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftpipe-collate")
        self._pending: dict[tuple[int, int], Future] = {}

    @property
    def layout(self) -> BatchLayout:
        return self.batches.layout

    def global_targets(self, offset: int) -> int:
        return self.batches.global_targets(offset)

    def micro_batch(self, offset: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        assert rank == self.rank, "a Prefetcher serves one rank"
        future = self._pending.pop((offset, micro), None)
        if future is None:  # the first batch, or another position than the one prefetched
            self._drop()
        batch = future.result() if future is not None else self.batches.micro_batch(offset, micro, rank)
        self._schedule(offset, micro)
        return batch

    def _schedule(self, offset: int, micro: int) -> None:
        for _ in range(self.ahead):
            offset, micro = self._following(offset, micro)
            if (offset, micro) not in self._pending:
                self._pending[(offset, micro)] = self._pool.submit(self.batches.micro_batch, offset, micro,
                                                                   self.rank)

    def _following(self, offset: int, micro: int) -> tuple[int, int]:
        if micro + 1 < self.layout.grad_accum:
            return offset, micro + 1
        return offset + self.layout.global_batch, 0

    def _drop(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._drop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
