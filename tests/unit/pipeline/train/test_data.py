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


def _rowwise_collate(sequences, pad_id, masks=None, seq_lens=None):
    """The per-row, per-token collate that collate_table replaced: the reference its tensors must equal."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    counted = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
        counted[i, : len(seq)] = torch.tensor(masks[i], dtype=torch.bool) if masks is not None else True
    batch = {"input_ids": ids, "attention_mask": mask}
    if seq_lens is not None:
        positions = torch.zeros((len(seq_lens), width), dtype=torch.long)
        segments = []
        for i, lens in enumerate(seq_lens):
            offset = 0
            for length in lens:
                positions[i, offset: offset + length] = torch.arange(length)
                counted[i, offset] = False
                offset += length
            segments += list(lens) + ([width - offset] if width > offset else [])
        batch.update(position_ids=positions, max_length=max(segments),
                     cu_seq_lens=torch.tensor([0] + segments, dtype=torch.int32).cumsum(0, dtype=torch.int32))
    batch["labels"] = ids.masked_fill(~counted, -100)
    return batch


def _random_rows(rng, packed: bool) -> dict:
    lens = [[int(n) for n in rng.integers(1, 7, rng.integers(1, 4))] for _ in range(5)]
    if not packed:
        lens = [[sum(row)] for row in lens]
    ids = [[int(t) for t in rng.integers(4, 100, sum(row))] for row in lens]
    columns = {"input_ids": ids, "loss_mask": [[int(m) for m in rng.integers(0, 2, len(r))] for r in ids],
               "num_targets": [len(r) for r in ids], "label": [int(x) for x in rng.integers(0, 3, 5)]}
    return {**columns, "seq_lens": lens} if packed else columns


@pytest.mark.parametrize("packed", [False, True])
def test_collate_from_arrow_buffers_gives_the_row_by_row_tensors(packed):
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.train.data import collate_table

    rng = np.random.default_rng(1)
    parts = [pa.table(_random_rows(rng, packed)) for _ in range(2)]
    table = pa.concat_tables(parts).take([7, 1, 4, 8, 2]).slice(1, 4)  # chunked, taken and sliced
    columns = table.to_pydict()
    expected = _rowwise_collate(columns["input_ids"], 3, columns["loss_mask"], columns.get("seq_lens"))
    expected["labels_of_rows"] = torch.tensor(columns["label"])
    got = collate_table(table.drop_columns(["label"]), 3)
    got["labels_of_rows"] = collate_table(table, 3)["labels"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
        assert not isinstance(value, torch.Tensor) or got[key].dtype == value.dtype, key
