"""Two ranks on CPU (gloo) through the real CLI and torchrun: every strategy must reproduce the
single-process run, with packed rows in attention tiles, LoRA and frozen layers too. (Killed ranks, stop
signals and resuming at another world size: test_distributed_resume.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.sweep import link_shared_data
from pipeline.plots import read_jsonl
from pipeline.run_dir import RunDir
from pipeline.tokenized import open_split
from pipeline.train.data import collate_table
from tests import fixtures
from tests.helpers import assert_close_weights, ftpipe, losses, manifest, weights
from tests.integration.distributed_runs import (
    BATCH,
    DATA_RUN,
    HELD_OUT,
    STRATEGIES,
    TRAINED,
    TWO_RANKS,
    run_config,
)

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def single_run(dist_workspace, tiny_llama) -> Path:
    tmp, data = dist_workspace
    assert ftpipe("run", run_config(tmp, tiny_llama, data, "single", HELD_OUT), *TRAINED) == 0
    return tmp / "runs" / "single"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_ranks_match_the_single_process_run(dist_workspace, tiny_llama, single_run, name):
    tmp, data = dist_workspace
    config = run_config(tmp, tiny_llama, data, name, {**STRATEGIES[name], **HELD_OUT}, TWO_RANKS)
    assert ftpipe("run", config, *TRAINED) == 0
    run = tmp / "runs" / name
    assert manifest(run, "train")["world_size"] == 2
    # held-out scoring during training, every rank in lockstep (sharded models too), reduced exactly
    held_out = [read_jsonl(r / "train" / "eval.jsonl") for r in (run, single_run)]
    assert [e["step"] for e in held_out[0]] == [3, 5] == [e["step"] for e in held_out[1]]
    assert [e["loss"] for e in held_out[0]] == pytest.approx([e["loss"] for e in held_out[1]], rel=1e-4)
    assert [peaks["rank"] for peaks in manifest(run, "train")["peak_memory"]] == [0, 1]  # gathered
    assert losses(run)[:5] == pytest.approx(losses(single_run)[:5], rel=1e-4)
    assert_close_weights(weights(run), weights(single_run), rtol=1e-4, atol=1e-5)
    assert manifest(run, "consolidate")["verify_max_abs_diff"] <= 1e-4



# Packed rows of 192 tokens of 4-14 word sentences: collate gives them tiled attention's layout.
PACKED = {"max_seq_len": 192, "packing": True}


def _packed_config(tmp: Path, model: Path, data: Path, name: str, train: dict, launch: dict | None) -> Path:
    cfg = fixtures.causal_config(tmp, model, data, name=name, train={**BATCH, **train}, data=PACKED)
    cfg["launch"] = launch or {}
    if name != "packed-single":
        link_shared_data(RunDir(tmp / "runs" / "packed-single"), RunDir(tmp / "runs" / name))
    return fixtures.write_config(tmp / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def packed_single(dist_workspace, tiny_llama) -> Path:
    tmp, data = dist_workspace
    config = _packed_config(tmp, tiny_llama, data, "packed-single", {}, None)
    assert ftpipe("run", config, "--stages", "shard,tokenize,train", "--no-progress") == 0
    return tmp / "runs" / "packed-single"


@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_packed_rows_in_attention_tiles_train_on_two_ranks_as_on_one(dist_workspace, tiny_llama,
                                                                     packed_single, name):
    """The tiles' layout reaches the attention through FSDP2's and DeepSpeed's wrappers as forward
    keyword arguments (train/tiled_attention.py)."""
    tmp, data = dist_workspace
    rows = open_split(packed_single / "tokenize" / "train")
    assert all("tile_mask" in collate_table(rows.slice(start, 2), 0) for start in range(0, 16, 2))
    config = _packed_config(tmp, tiny_llama, data, f"packed-{name}", STRATEGIES[name], TWO_RANKS)
    assert ftpipe("run", config, "--stages", "train", "--no-progress") == 0
    assert losses(tmp / "runs" / f"packed-{name}") == pytest.approx(losses(packed_single), rel=1e-4)

PARTIAL = {
    "lora": {"model": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}},
    "freeze": {"train": {"freeze": {"patterns": ["model.embed_tokens.*"], "train_last_layers": 1}}},
}


def _partial_config(tmp: Path, model: Path, data: Path, name: str, partial: str, train: dict,
                    launch: dict | None = None) -> Path:
    cfg = fixtures.causal_config(tmp, model, data, name=name,
                                 train={**BATCH, **train, **PARTIAL[partial].get("train", {})})
    cfg["model"].update(PARTIAL[partial].get("model", {}))
    cfg["launch"] = launch or {}
    cfg["evaluate"] = {"batch_size": 8, "num_generations": 0}
    link_shared_data(RunDir(tmp / "runs" / DATA_RUN), RunDir(tmp / "runs" / name))
    return fixtures.write_config(tmp / f"{name}.yaml", cfg)


@pytest.mark.parametrize("partial,name", [("lora", "fsdp"), ("lora", "zero3"), ("freeze", "ddp"),
                                          ("freeze", "zero2")])
def test_lora_and_freezing_work_with_every_strategy(dist_workspace, tiny_llama, partial, name):
    tmp, data = dist_workspace
    single = tmp / "runs" / f"{partial}-single"
    if not (single / "consolidate" / "manifest.json").exists():
        assert ftpipe("run", _partial_config(tmp, tiny_llama, data, f"{partial}-single", partial, {}),
                      *TRAINED) == 0
    config = _partial_config(tmp, tiny_llama, data, f"{partial}-{name}", partial, STRATEGIES[name], TWO_RANKS)
    assert ftpipe("run", config, *TRAINED) == 0
    run = tmp / "runs" / f"{partial}-{name}"
    assert losses(run)[:5] == pytest.approx(losses(single)[:5], rel=1e-4)
    assert manifest(run, "train")["trainable_parameters"] == manifest(single, "train")["trainable_parameters"]
    assert_close_weights(weights(run), weights(single), rtol=1e-4, atol=1e-5)
    if partial == "freeze":  # the frozen embedding leaves training untouched
        initial = _initial_weights(tiny_llama)
        assert torch.equal(weights(run)["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def _initial_weights(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(model.glob("*.safetensors"))))
