"""Memory that fits the GPU: a bf16 frozen base under LoRA, activation checkpointing per transformer
block for every strategy (FSDP2: checkpoint_wrapper before fully_shard), exactly the same losses."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from pipeline import distributed
from pipeline.config import validate_config
from pipeline.train.build import build_engine
from tests.fixtures import causal_config, write_config
from tests.helpers import ftpipe, manifest

STRATEGIES = ["single", "fsdp"]  # ddp and deepspeed prepare the model as single does (partial.py)


def engine_for(tmp_path: Path, model: Path, strategy: str, lora: bool = False, **train):
    raw = causal_config(tmp_path, model, tmp_path / "t.jsonl", train={"strategy": strategy, **train})
    if lora:
        raw["model"]["lora"] = {"r": 4}
    cfg = validate_config(raw)
    distributed.seed_everything(0)
    return build_engine(cfg, distributed.init(need_group=strategy != "single"))


def two_steps(engine) -> list[float]:
    """The losses of a fixed batch before and after one optimizer step."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(4, 290, (2, 24), generator=generator)
    out = []
    for _ in range(2):
        with engine.autocast():
            loss = engine.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


@pytest.fixture
def group():
    yield
    distributed.shutdown()


def count_block_forwards(engine) -> list[int]:
    """Forward passes into the first block's MLP: recomputation in backward enters it again (a pre-hook:
    the recomputation stops early, once it has every tensor backward needs)."""
    calls = [0]
    first = next(m for m in engine.unwrapped.modules() if type(m).__name__ == "LlamaDecoderLayer")
    first.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_activation_checkpointing_recomputes_each_block_and_changes_no_loss(tmp_path, tiny_llama, group,
                                                                             strategy):
    plain = engine_for(tmp_path, tiny_llama, strategy)
    expected = two_steps(plain)
    distributed.shutdown()
    engine = engine_for(tmp_path, tiny_llama, strategy, activation_checkpointing=True)
    blocks = [m for m in engine.unwrapped.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    if strategy == "fsdp":  # each block inside torch's wrapper, and the wrapper is FSDP's unit
        wrappers = [m for m in engine.unwrapped.modules() if isinstance(m, CheckpointWrapper)]
        assert len(wrappers) == len(blocks) == 2
        assert all(type(w).__name__.startswith("FSDP") for w in wrappers)  # sharded as the unit
        assert "_checkpoint_wrapped_module" not in "".join(engine.unwrapped.state_dict())
    else:  # each block's forward checkpointed in place: parameter names unchanged
        assert len(blocks) == 2 and all(isinstance(b.forward, functools.partial) for b in blocks)
        assert list(engine.unwrapped.state_dict()) == list(plain.unwrapped.state_dict())
    calls = count_block_forwards(engine)
    assert two_steps(engine) == pytest.approx(expected, abs=1e-6)
    assert calls[0] == 4, "each block runs forward twice per step: once more in backward"


def test_lora_in_bf16_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(tmp_path, tiny_llama, group):
    engine = engine_for(tmp_path, tiny_llama, "fsdp", lora=True, precision="bf16")
    params = dict(engine.unwrapped.named_parameters())
    frozen = {p.dtype for p in params.values() if not p.requires_grad}
    trained = {n: p for n, p in params.items() if p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in trained.values()} == {torch.float32}
    assert trained and all("lora_" in name for name in trained)
    before = {n: p.detach().clone() for n, p in trained.items() if "lora_B" in n}
    losses = two_steps(engine)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], trained[n].detach()) for n in before), "the adapters trained"


def test_a_full_fine_tune_in_bf16_still_loads_fp32_weights(tmp_path, tiny_llama, group):
    engine = engine_for(tmp_path, tiny_llama, "single", precision="bf16")
    assert {p.dtype for p in engine.unwrapped.parameters()} == {torch.float32}



def test_a_bf16_lora_run_checkpoints_a_bf16_base_and_consolidates_verified(tmp_path, tiny_llama, text_data):
    # allow_slow_bf16: bf16 even where the CPU emulates it (a tiny model; else it trains in fp32)
    train = {"precision": "bf16", "allow_slow_bf16": True, "max_steps": 2}
    cfg = causal_config(tmp_path, tiny_llama, text_data, train=train)
    cfg["model"]["lora"] = {"r": 4}
    assert ftpipe("run", write_config(tmp_path / "lora.yaml", cfg), "--no-progress", "--stages",
                  "shard,tokenize,train,consolidate") == 0
    run = tmp_path / "runs" / "lm"
    saved = torch.load(run / "train" / "checkpoints" / "step-000002" / "model.pt", weights_only=True)
    assert {t.dtype for n, t in saved.items() if "lora_" in n} == {torch.float32}
    assert {t.dtype for n, t in saved.items() if "lora_" not in n} == {torch.bfloat16}
    check = manifest(run, "consolidate")  # merged into bf16 weights: logits agree to bf16's resolution
    assert check["verify"] == "logits+weights" and check["verify_max_abs_weight_diff"] == 0.0
