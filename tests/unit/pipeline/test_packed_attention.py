"""Packed rows without an L x L mask: position_ids that restart per example, no attention_mask and
no cache let transformers keep every example to itself for each attention backend; the collate and
loss the train loop uses give exactly the logits and losses of the examples one by one."""

from __future__ import annotations

import importlib.util

import pyarrow as pa
import pytest
import torch

from pipeline.config import ModelConfig, validate_config
from pipeline.errors import UserError
from pipeline.models import load_model
from pipeline.train.data import collate_table
from pipeline.train.objective import attention_backend, model_inputs, summed_loss

EXAMPLES = [[5, 17, 42, 9, 11], [7, 7, 80, 3], [60, 61, 62, 63, 64, 65], [21, 22, 23]]
PAD = 3


def packed_table() -> pa.Table:
    """Two packed rows (the second shorter, so padded) as tokenize stores them."""
    rows = [EXAMPLES[0] + EXAMPLES[1] + EXAMPLES[3], EXAMPLES[2]]
    return pa.table({"input_ids": rows, "seq_lens": [[5, 4, 3], [6]],
                     "num_targets": [4 + 3 + 2, 5]})


def examples_in_row_order() -> list[tuple[int, int, list[int]]]:
    return [(0, 0, EXAMPLES[0]), (0, 5, EXAMPLES[1]), (0, 9, EXAMPLES[3]), (1, 0, EXAMPLES[2])]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_llama):
    loaded = load_model(ModelConfig(name_or_path=str(tiny_llama), attn_implementation=request.param))
    assert attention_backend(loaded) == request.param  # passed to from_pretrained
    return loaded.eval()


def alone(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@torch.no_grad()
def test_packed_logits_and_loss_equal_the_examples_alone(model):
    batch = collate_table(packed_table(), PAD)
    assert "attention_bias" not in batch and batch["input_ids"].shape == (2, 12)
    logits = model(**model_inputs(batch, attention_backend(model))).logits
    for row, start, ids in examples_in_row_order():
        torch.testing.assert_close(logits[row, start: start + len(ids)], alone(model, ids), atol=1e-5, rtol=0)
    single = [collate_table(pa.table({"input_ids": [ids], "num_targets": [len(ids) - 1]}), PAD)
              for ids in EXAMPLES]
    expected = sum(float(summed_loss(model, b, "causal_lm")) for b in single)
    assert float(summed_loss(model, batch, "causal_lm")) == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_a_cache_or_an_all_ones_mask_would_mix_the_examples(model):
    """The two silent traps: either one turns packed-sequence detection off, and the second example
    of a row then attends to the first. If this stops being true, the exactness test above could
    pass for the wrong reason."""
    batch = collate_table(packed_table(), PAD)
    inputs = model_inputs(batch, attention_backend(model))
    assert inputs["use_cache"] is False and "attention_mask" not in inputs
    second = slice(5, 9)
    exact = alone(model, EXAMPLES[1])
    cached = model(**{**inputs, "use_cache": True}).logits[0, second]
    ones = model(**inputs, attention_mask=torch.ones_like(batch["input_ids"])).logits[0, second]
    for mixed in (cached, ones):
        assert (mixed - exact).abs().max() > 1e-3


def test_flash_backends_get_the_boundaries_of_the_flattened_batch():
    batch = collate_table(packed_table(), PAD)
    # row 0: 5 + 4 + 3 tokens; row 1: 6 tokens and 6 of padding (one more segment)
    assert batch["cu_seq_lens"].tolist() == [0, 5, 9, 12, 18, 24] and batch["max_length"] == 6
    assert isinstance(batch["max_length"], int)  # an int: the kernel needs no device sync
    flat = batch["input_ids"].reshape(-1).tolist()
    bounds = batch["cu_seq_lens"].tolist()
    assert [flat[a:b] for a, b in zip(bounds, bounds[1:])][:4] == [EXAMPLES[0], EXAMPLES[1], EXAMPLES[3],
                                                                     EXAMPLES[2]]
    flash = model_inputs(batch, "flash_attention_2")
    assert flash["cu_seq_lens_q"] is flash["cu_seq_lens_k"] is batch["cu_seq_lens"]
    assert flash["max_length_q"] == flash["max_length_k"] == 6 and "attention_mask" not in flash
    assert "cu_seq_lens_q" not in model_inputs(batch, "sdpa")


def test_unpacked_batches_keep_their_padding_mask():
    batch = collate_table(pa.table({"input_ids": [EXAMPLES[0], EXAMPLES[3]], "num_targets": [4, 2]}), PAD)
    inputs = model_inputs(batch, "sdpa")
    assert inputs["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]] and "position_ids" not in inputs


def config_with(attn: str) -> dict:
    return {"name": "x", "model": {"name_or_path": "m", "attn_implementation": attn},
            "data": {"train": ["t.jsonl"], "format": "text"}}


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_backends_that_run_here_validate(attn):
    assert validate_config(config_with(attn)).model.attn_implementation == attn


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is not None,
                    reason="a CPU machine without flash-attn refuses the flash backends")
@pytest.mark.parametrize("attn, why", [
    ("flash_attention_2", "needs the python package 'flash_attn'"),
    ("flash_attention_3", "needs the python package 'flash_attn_interface'"),
    ("bogus", "is none of sdpa, eager"),
])
def test_backends_this_machine_cannot_run_are_refused_naming_the_key(attn, why):
    with pytest.raises(UserError, match=rf"^<config>: model\.attn_implementation: .*{why}") as err:
        validate_config(config_with(attn))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_flash_without_cuda_is_refused_even_when_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real(name, *a))
    with pytest.raises(UserError, match=r"model\.attn_implementation: flash_attention_2 needs a CUDA GPU"):
        validate_config(config_with("flash_attention_2"))
