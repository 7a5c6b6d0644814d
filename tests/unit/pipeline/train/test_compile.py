"""train.compile: every transformer block's forward goes through torch.compile and the tiny model trains
to the same losses. Inductor's C++ build takes minutes on these CPUs, so the test compiles with
dynamo's eager backend (the same graph capture, no code generation); the measured inductor numbers
are in docs/benchmarks.md."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest
import torch

from pipeline import distributed
from pipeline.config import validate_config
from pipeline.train import partial
from pipeline.train.build import pretrained
from pipeline.train.data import collate_table
from pipeline.train.engine import SingleEngine
from pipeline.train.objective import summed_loss
from tests.fixtures import causal_config

ROWS = [[5, 17, 42, 9, 11, 7, 7, 80, 3, 21], [60, 61, 62, 63, 64, 65], [8, 9, 10, 11, 12, 13, 14]]


def _losses(tmp_path, tiny_llama, compiled: bool) -> tuple[list[float], torch.nn.Module]:
    cfg = validate_config(causal_config(tmp_path, tiny_llama, tmp_path / "data.jsonl",
                                        train={"compile": compiled, "lr": 1e-2}))
    torch.manual_seed(0)
    engine = SingleEngine(pretrained(cfg, torch.device("cpu")), cfg.train, distributed.DistEnv())
    losses = []
    for width in (10, 7, 10):  # a second shape: compiled code must follow it
        batch = collate_table(pa.table({"input_ids": [r[:width] for r in ROWS]}), 3)
        loss = summed_loss(engine.model, batch, "causal_lm") / 20
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses, engine.model


def test_compiled_blocks_train_to_the_same_losses(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(partial, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    expected, plain = _losses(tmp_path, tiny_llama, compiled=False)
    got, model = _losses(tmp_path, tiny_llama, compiled=True)
    blocks = partial.block_modules(model)
    assert blocks and all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks)
    assert not any(hasattr(b.forward, "_torchdynamo_orig_callable") for b in partial.block_modules(plain))
    assert got == pytest.approx(expected, rel=1e-5)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_strategies_it_is_not_tested_with_stay_uncompiled_and_say_so(tiny_llama):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    # a handler of our own: ftpipe's logger does not propagate once the CLI has set it up
    logger, records = logging.getLogger("ftpipe"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        partial.compile_blocks(model, "fsdp")
    finally:
        logger.removeHandler(handler)
    assert ["train.compile is not applied with strategy fsdp" in r.getMessage() for r in records] == [True]
    assert not any(hasattr(b.forward, "_torchdynamo_orig_callable") for b in partial.block_modules(model))
