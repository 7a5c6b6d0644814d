"""Tiled sdpa for packed rows: the same logits, loss and gradients as transformers' own sdpa path
with its L x L block-diagonal mask; rows where tiles would not pay keep that path."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import load_model
from pipeline.train import tiled_attention
from pipeline.train.data import collate_table
from pipeline.train.objective import attention_backend, joins_rows, model_inputs, summed_loss
from pipeline.train.tiled_attention import NAME, TILE, reach_class, tile_layout, use_tiled_attention

PAD = 3


def packed_rows(lengths: list[list[int]], seed: int = 0) -> pa.Table:
    """Rows of examples of these lengths, random ids, as tokenize stores packed rows."""
    rng = random.Random(seed)
    rows = [[rng.randrange(4, 100) for _ in range(sum(row))] for row in lengths]
    return pa.table({"input_ids": rows, "seq_lens": lengths,
                     "num_targets": [sum(n - 1 for n in row) for row in lengths]})


# Short examples, rows of different fill (the last one padded), width 150: not a multiple of TILE.
SHORT = [[9, 30, 4, 17, 22, 40, 28], [25] * 6, [12, 33, 7, 21, 50, 11, 16], [5, 9, 14]]
# The same with one long example: its tiles reach far back, the others' tiles stay short.
ONE_LONG = [[9, 30, 4, 17, 22, 40, 28], [140, 10], [12, 33, 7, 21, 50, 11, 16], [5, 9, 14]]


def keys_scored(batch) -> int:
    """Query-key pairs the tiles score (per head), against a row's width squared for the mask path."""
    return sum(count * TILE * (TILE + reach) for count, reach in batch["tile_classes"])


@pytest.fixture(scope="module")
def models(tiny_llama):
    plain = load_model(ModelConfig(name_or_path=str(tiny_llama)))
    tiled = use_tiled_attention(load_model(ModelConfig(name_or_path=str(tiny_llama))))
    assert attention_backend(plain) == "sdpa" and attention_backend(tiled) == NAME
    return plain, tiled


@pytest.fixture
def tile_calls(monkeypatch) -> list[int]:
    """The tiles each sdpa call of the tiled path scores: proof that a test ran that path."""
    calls: list[int] = []
    attend = tiled_attention._attend

    def counted(queries, *args):
        calls.append(queries.size(0) // TILE)
        return attend(queries, *args)

    monkeypatch.setattr(tiled_attention, "_attend", counted)
    return calls


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = summed_loss(model, batch, "causal_lm")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lengths", [SHORT, ONE_LONG], ids=["short", "one-long"])
def test_tiles_give_the_loss_and_gradients_of_the_block_diagonal_mask(models, lengths, tile_calls):
    plain, tiled = models
    batch = collate_table(packed_rows(lengths), PAD)
    assert batch["input_ids"].shape == (4, 150)
    assert keys_scored(batch) < 4 * 150 * 150 / 2  # the tiles see far fewer keys than the rows' 150
    assert "tile_mask" in model_inputs(batch, NAME) and "tile_mask" not in model_inputs(batch, "sdpa")
    expected, expected_grads = loss_and_grads(plain, batch)
    assert not tile_calls
    loss, grads = loss_and_grads(tiled, batch)
    layers = tiled.config.num_hidden_layers
    assert tile_calls == [count for count, _ in batch["tile_classes"]] * layers
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
@pytest.mark.parametrize("rows", [SHORT, ONE_LONG], ids=["short", "one-long"])
def test_every_example_still_sees_only_itself(models, rows, tile_calls):
    _, tiled = models
    batch = collate_table(packed_rows(rows), PAD)
    logits = tiled(**model_inputs(batch, NAME)).logits
    assert sum(tile_calls) == 4 * 5 * tiled.config.num_hidden_layers  # every tile of every layer
    ids = batch["input_ids"]
    for row, lengths in enumerate(rows):
        starts = np.cumsum([0] + lengths[:-1])
        for start, n in zip(starts, lengths):
            alone = tiled(input_ids=ids[row:row + 1, start:start + n], use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, start:start + n], alone, atol=1e-5, rtol=0)


def test_rows_of_long_examples_keep_the_mask_path():
    assert tile_layout(np.tile(np.arange(128), (2, 1))) == {}  # one example per row: no saving
    short = np.tile(np.concatenate([np.arange(16)] * 8), (2, 1))
    assert tile_layout(short)["tile_classes"] == ((8, 0),)  # examples that never cross a tile's start


def test_one_long_example_costs_only_its_own_tiles_their_keys():
    """Tiles are grouped by how far back their examples started: the long example's tiles reach back
    32, 64, 96 and 128 keys, every other tile 32 at most. One reach for all tiles (128) would not halve
    the work, and the whole batch would take the L x L mask."""
    batch = collate_table(packed_rows(ONE_LONG), PAD)
    assert dict((reach, count) for count, reach in batch["tile_classes"]) == {0: 8, TILE: 9, 64: 1, 96: 1,
                                                                              128: 1}
    assert keys_scored(batch) < 0.45 * 4 * 150 * 150


def test_reach_classes_round_up_to_two_significant_bits_of_tiles():
    reach = np.array([0, 1, 32, 33, 64, 65, 96, 97, 129, 193, 200, 257, 385, 1000])
    assert reach_class(reach).tolist() == [TILE * k for k in (0, 1, 1, 2, 2, 3, 3, 4, 6, 8, 8, 12, 16, 32)]


def test_attention_the_tiles_do_not_model_takes_transformers_path():
    classes = ((6, 0), (2, 64))
    tiles_model = tiled_attention._tiles_model
    assert tiles_model({"dropout": 0.0, "scaling": 0.1, "sliding_window": None, "use_cache": False}, classes)
    assert tiles_model({"sliding_window": TILE + 64}, classes)
    assert not tiles_model({"sliding_window": TILE + 63}, classes)  # a tile's keys would pass the window
    assert not tiles_model({"softcap": 30.0}, classes) and not tiles_model({"position_bias": 1}, classes)


@torch.no_grad()
def test_batches_without_a_layout_run_transformers_sdpa(models, tile_calls):
    plain, tiled = models
    padded = collate_table(pa.table({"input_ids": [[5, 6, 7, 8, 9], [10, 11]], "num_targets": [4, 1]}), PAD)
    for batch in (padded, collate_table(packed_rows([[5, 4], [6]]), PAD)):
        assert "tile_mask" not in batch
        torch.testing.assert_close(tiled(**model_inputs(batch, NAME)).logits,
                                   plain(**model_inputs(batch, "sdpa")).logits)
    assert not tile_calls


def test_the_saved_config_names_no_ftpipe_attention(models, tmp_path):
    """A consolidated model must load anywhere: the attention name is ftpipe's process-local one."""
    _, tiled = models
    tiled.config.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text()).get("attn_implementation") is None


# --- packed rows joined into one row (train/data.py collate_table, join_rows) ---------------------------

def test_joined_rows_carry_every_token_once_and_no_padding():
    table = packed_rows(SHORT)
    rows, joined = collate_table(table, PAD), collate_table(table, PAD, join_rows=True)
    real = rows["attention_mask"].bool()
    assert joined["input_ids"].shape == (1, int(real.sum())) and bool(joined["attention_mask"].all())
    for key in ("input_ids", "labels", "position_ids"):
        torch.testing.assert_close(joined[key][0], rows[key][real], msg=key)


@pytest.mark.parametrize("lengths", [SHORT, ONE_LONG], ids=["short", "one-long"])
def test_joined_rows_give_the_loss_and_gradients_of_the_rows(models, lengths, tile_calls):
    _, tiled = models
    table = packed_rows(lengths)
    expected, expected_grads = loss_and_grads(tiled, collate_table(table, PAD))
    joined = collate_table(table, PAD, join_rows=True)
    tile_calls.clear()
    loss, grads = loss_and_grads(tiled, joined)
    assert sum(tile_calls) == len(joined["tile_queries"]) // TILE * tiled.config.num_hidden_layers
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_rows_of_long_examples_stay_rows():
    """Joined, their tiles would score more than half the keys of the rows' own masks."""
    for lengths in ([[150]] * 4, [[100, 50]] * 2):
        assert collate_table(packed_rows(lengths), PAD, join_rows=True)["input_ids"].shape[0] == len(lengths)


def test_rows_are_joined_only_for_attention_that_needs_no_mask(models):
    plain, tiled = models
    assert joins_rows(tiled) and not joins_rows(plain)
    eager = load_model(ModelConfig(name_or_path=str(tiled.name_or_path), attn_implementation="eager"))
    assert not joins_rows(use_tiled_attention(eager))  # eager is not tiled: its mask would be L x L
    def model(backend: str, **config):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=backend, **config))

    # Flash kernels read the examples from cu_seq_lens and apply windows themselves.
    assert joins_rows(model("flash_attention_2", sliding_window=64))
    # Tiles step aside for a short window: the mask over the joined row would cost rows-fold.
    assert not joins_rows(model(NAME, sliding_window=4096))
    assert joins_rows(model(NAME, sliding_window=4096, use_sliding_window=False))  # Qwen2's switch
