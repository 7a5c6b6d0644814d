"""Sample order and batch layout: the same samples at any world size."""

import pytest

from pipeline.train.data import BatchLayout, SampleOrder


def test_sample_order_is_a_permutation_per_epoch_and_world_size_free():
    order = SampleOrder(10, seed=3)
    first, second = order.rows(0, 10), order.rows(10, 10)
    assert sorted(first) == list(range(10)) == sorted(second) and list(first) != list(second)
    assert list(order.rows(5, 10)) == list(first[5:]) + list(second[:5])
    one, two = BatchLayout(4, 2, 1), BatchLayout(2, 2, 2)
    assert one.global_batch == two.global_batch == 8
    seen = sorted(two.micro_start(24, m, r) + i for m in range(2) for r in range(2) for i in range(2))
    assert seen == list(range(24, 32))


def test_global_batch_size_fixes_the_global_batch_at_any_world_size():
    from pipeline.config import TrainConfig
    from pipeline.errors import UserError
    from pipeline.train.data import batch_layout

    cfg = TrainConfig(micro_batch_size=2, global_batch_size=8)
    assert [batch_layout(cfg, n).grad_accum for n in (1, 2, 4)] == [4, 2, 1]
    assert batch_layout(TrainConfig(micro_batch_size=2, grad_accum=3), 2).global_batch == 12
    with pytest.raises(UserError,
                       match="global_batch_size: 8 is not a multiple of micro_batch_size x ranks = 2 x 3"):
        batch_layout(cfg, 3)
