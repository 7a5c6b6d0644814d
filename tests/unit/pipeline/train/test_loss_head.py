"""train.fused_loss: the summed causal LM loss from the final hidden states in checkpointed chunks equals
the full-logits loss, and its parameter gradients, in fp32; which loss each setting picks."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.config import validate_config
from pipeline.errors import UserError
from pipeline.train.build import pretrained
from pipeline.train.data import collate_table
from pipeline.train.loss_head import LinearCrossEntropy, LossHead, install_loss_head, loss_head, loss_kind
from pipeline.train.objective import summed_loss
from tests.fixtures import causal_config

PAD = 3
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
ROWS = [[5, 17, 42, 9, 11, 7, 7, 80, 3, 21, 22, 23], [60, 61, 62, 63, 64, 65]]


def _batch(packed: bool) -> dict:
    columns = {"input_ids": ROWS, "num_targets": [9, 5],
               "loss_mask": [[0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1], [1] * 6]}
    if packed:
        columns["seq_lens"] = [[5, 4, 3], [6]]
    return collate_table(pa.table(columns), PAD)


def _model(tmp_path, tiny_llama, fused_loss: str, lora: dict | None) -> torch.nn.Module:
    raw = causal_config(tmp_path, tiny_llama, tmp_path / "data.jsonl", train={"fused_loss": fused_loss})
    raw["model"]["lora"] = lora
    cfg = validate_config(raw)
    return pretrained(cfg, torch.device("cpu"))


def _counted(forward, calls: list):
    def counting(*args):
        calls.append(1)
        return forward(*args)
    return staticmethod(counting)


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    loss = summed_loss(model, batch, "causal_lm")
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("forward_gradients", [True, False], ids=["forward-gradients", "checkpointed"])
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_the_chunked_loss_and_its_gradients_equal_the_full_logits_ones(tmp_path, tiny_llama, lora,
                                                                       forward_gradients, monkeypatch):
    reference = _model(tmp_path, tiny_llama, "off", lora)
    chunked = _model(tmp_path, tiny_llama, "auto", lora)
    assert loss_head(reference) is None and isinstance(loss_head(chunked), LossHead)
    loss_head(chunked).chunk_tokens = 4  # several chunks, the last one short
    loss_head(chunked).forward_gradients = forward_gradients
    calls = []
    monkeypatch.setattr(LinearCrossEntropy, "forward", _counted(LinearCrossEntropy.forward, calls))
    for packed in (False, True):
        batch = _batch(packed)
        expected, expected_grads = _loss_and_grads(reference, batch)
        got, grads = _loss_and_grads(chunked, batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        reference.zero_grad(), chunked.zero_grad()
    assert len(calls) == (2 if forward_gradients else 0), "the path under test computed the loss"
    # outside summed_loss the head still gives logits (verify logits, generation)
    ids = torch.tensor(ROWS[1:])
    torch.testing.assert_close(chunked(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_batch_without_targets_still_gives_the_head_a_zero_gradient(tmp_path, tiny_llama):
    """DDP and ZeRO expect a gradient for every parameter from every rank's backward."""
    model = _model(tmp_path, tiny_llama, "auto", None)
    batch = _batch(packed=False)
    batch["labels"].fill_(-100)
    loss = summed_loss(model, batch, "causal_lm")
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is not None for p in model.parameters())


def test_which_loss_each_setting_picks():
    """Liger's kernel needs CUDA: only the choice is tested here, its path cannot run on these CPUs."""
    assert loss_kind("off", "cuda", plain_linear=True, liger=True) == "logits"
    assert loss_kind("auto", "cuda", plain_linear=True, liger=True) == "liger"
    assert loss_kind("auto", "cuda", plain_linear=True, liger=False) == "chunked"
    assert loss_kind("auto", "cpu", plain_linear=True, liger=True) == "chunked"
    assert loss_kind("auto", "cuda", plain_linear=False, liger=True) == "chunked"  # LoRA on the head
    assert loss_kind("on", "cuda", plain_linear=True, liger=True) == "liger"
    with pytest.raises(UserError, match="train.fused_loss: on needs CUDA"):
        loss_kind("on", "cpu", plain_linear=True, liger=True)


def test_a_model_that_transforms_its_logits_after_the_head_trains_on_full_logits():
    """Gemma 2 softcaps the head's logits: applied to a summed loss that would be a silently wrong loss."""
    import logging

    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=2.0)
    model = install_loss_head(Gemma2ForCausalLM(config), "auto")
    batch = _batch(packed=False)
    logger, records = logging.getLogger("ftpipe"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        got = summed_loss(model, batch, "causal_lm")
    finally:
        logger.removeHandler(handler)
    assert loss_head(model) is None and "transforms its logits" in records[0].getMessage()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), batch["labels"][:, 1:].reshape(-1),
                                                 reduction="sum")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_a_target_far_below_the_best_logit_keeps_its_exact_loss(with_bias):
    """The loss comes from the softmax (-log p); where p underflows in fp32 (a target 100 nats below
    the best logit) it must still be logsumexp - logit, never inf, and the gradients those of the
    full logits. Chunks of 3 tokens: the buffers are reused across chunks, the last one shorter."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(11, 8).requires_grad_()
    bias = torch.randn(11).requires_grad_() if with_bias else None
    targets = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    with torch.no_grad():
        weight[2] -= 40 * hidden[1].detach() / hidden[1].detach().norm() ** 2 * 3  # target 2 of token 1
    loss = LinearCrossEntropy.apply(hidden, weight, bias, targets, 3)
    grads = torch.autograd.grad(loss, [t for t in (hidden, weight, bias) if t is not None])
    logits = torch.nn.functional.linear(hidden, weight, bias)
    assert float(logits[1].max() - logits[1, 2]) > 100  # the case this test is about
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected, [t for t in (hidden, weight, bias) if t is not None])
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


def test_bf16_weights_give_the_loss_and_gradients_of_bf16_logits():
    """A bf16 head (a LoRA run's frozen base in bf16): logits computed in bf16, upcast per chunk."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(13, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    loss = LinearCrossEntropy.apply(hidden, weight, None, targets, 4)
    grads = torch.autograd.grad(loss, [hidden, weight])
    expected = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for grad, want in zip(grads, expected_grads):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, want, rtol=2e-2, atol=2e-2)
