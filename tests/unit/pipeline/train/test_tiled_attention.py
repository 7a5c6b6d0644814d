"""Tiled sdpa for packed rows: the same logits, loss and gradients as transformers' own sdpa path
with its L x L block-diagonal mask; rows where tiles would not pay keep that path."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import load_model
from pipeline.train.data import collate_table
from pipeline.train.objective import attention_backend, model_inputs, summed_loss
from pipeline.train.tiled_attention import NAME, TILE, tile_layout, use_tiled_attention

PAD = 3


def packed_rows(lengths: list[list[int]], seed: int = 0) -> pa.Table:
    """Rows of examples of these lengths, random ids, as tokenize stores packed rows."""
    rng = random.Random(seed)
    rows = [[rng.randrange(4, 100) for _ in range(sum(row))] for row in lengths]
    return pa.table({"input_ids": rows, "seq_lens": lengths,
                     "num_targets": [sum(n - 1 for n in row) for row in lengths]})


# Short examples, rows of different fill (the last one padded), width 150: not a multiple of TILE.
SHORT = [[9, 30, 4, 17, 22, 40, 28], [25] * 6, [12, 33, 7, 21, 50, 11, 16], [5, 9, 14]]


@pytest.fixture(scope="module")
def models(tiny_llama):
    plain = load_model(ModelConfig(name_or_path=str(tiny_llama)))
    tiled = use_tiled_attention(load_model(ModelConfig(name_or_path=str(tiny_llama))))
    assert attention_backend(plain) == "sdpa" and attention_backend(tiled) == NAME
    return plain, tiled


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = summed_loss(model, batch, "causal_lm")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiles_give_the_loss_and_gradients_of_the_block_diagonal_mask(models):
    plain, tiled = models
    batch = collate_table(packed_rows(SHORT), PAD)
    assert batch["input_ids"].shape == (4, 150) and batch["tile_mask"].shape[-2] == TILE
    assert batch["tile_reach"] < 50  # the tiles see far fewer keys than the row's 150
    assert "tile_mask" in model_inputs(batch, NAME) and "tile_mask" not in model_inputs(batch, "sdpa")
    expected, expected_grads = loss_and_grads(plain, batch)
    loss, grads = loss_and_grads(tiled, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def test_every_example_still_sees_only_itself(models):
    _, tiled = models
    batch = collate_table(packed_rows(SHORT), PAD)
    logits = tiled(**model_inputs(batch, NAME)).logits
    ids = batch["input_ids"]
    for row, lengths in enumerate(SHORT):
        starts = np.cumsum([0] + lengths[:-1])
        for start, n in zip(starts, lengths):
            alone = tiled(input_ids=ids[row:row + 1, start:start + n], use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, start:start + n], alone, atol=1e-5, rtol=0)


def test_rows_of_long_examples_keep_the_mask_path():
    assert tile_layout(np.tile(np.arange(128), (2, 1))) == {}  # one example per row: no saving
    short = np.tile(np.concatenate([np.arange(16)] * 8), (2, 1))
    assert tile_layout(short)["tile_reach"] == 0  # examples that never cross a tile's start


@torch.no_grad()
def test_batches_without_a_layout_run_transformers_sdpa(models):
    plain, tiled = models
    padded = collate_table(pa.table({"input_ids": [[5, 6, 7, 8, 9], [10, 11]], "num_targets": [4, 1]}), PAD)
    for batch in (padded, collate_table(packed_rows([[5, 4], [6]]), PAD)):
        assert "tile_mask" not in batch
        torch.testing.assert_close(tiled(**model_inputs(batch, NAME)).logits,
                                   plain(**model_inputs(batch, "sdpa")).logits)


def test_the_saved_config_names_no_ftpipe_attention(models, tmp_path):
    """A consolidated model must load anywhere: the attention name is ftpipe's process-local one."""
    _, tiled = models
    tiled.config.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text()).get("attn_implementation") is None
