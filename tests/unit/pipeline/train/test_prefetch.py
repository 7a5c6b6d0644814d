"""The next micro-batches are collated on a background thread, and are the batches the loop asked for."""

from __future__ import annotations

import threading

import pyarrow as pa
import torch

from pipeline.train.data import BatchLayout, TrainBatches
from pipeline.train.prefetch import Prefetcher


def _batches() -> TrainBatches:
    ids = [[4 + i] * (2 + i % 5) for i in range(10)]
    table = pa.table({"input_ids": ids, "num_targets": [len(r) - 1 for r in ids]})
    return TrainBatches(table, BatchLayout(micro_batch_size=2, grad_accum=2, world_size=2), seed=0, pad_id=3)


def _equal(one: dict, other: dict) -> bool:
    return one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def test_the_following_micro_batches_are_collated_on_the_worker_thread():
    batches, direct = _batches(), _batches()
    threads: list[str] = []
    collate = batches.micro_batch

    def recorded(offset: int, micro: int, rank: int) -> dict:
        threads.append(threading.current_thread().name)
        return collate(offset, micro, rank)

    batches.micro_batch = recorded
    positions = [(offset, micro) for offset in (0, 8, 16) for micro in (0, 1)]  # crosses an epoch (10 rows)
    with Prefetcher(batches, rank=1) as ahead:
        got = [ahead.micro_batch(offset, micro, 1) for offset, micro in positions]
    assert all(_equal(batch, direct.micro_batch(o, m, 1)) for batch, (o, m) in zip(got, positions))
    assert threads[0] == threading.main_thread().name  # nothing to prefetch for the very first one
    assert all(name.startswith("ftpipe-collate") for name in threads[1:len(positions)])


def test_a_jump_to_another_position_gives_the_batch_there():
    """A resumed or extended run asks for positions nothing was prefetched for."""
    batches, direct = _batches(), _batches()
    with Prefetcher(batches, rank=0) as ahead:
        ahead.micro_batch(0, 0, 0)
        assert _equal(ahead.micro_batch(24, 1, 0), direct.micro_batch(24, 1, 0))
        assert _equal(ahead.micro_batch(32, 0, 0), direct.micro_batch(32, 0, 0))
