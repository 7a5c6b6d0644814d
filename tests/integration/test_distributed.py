"""Two ranks on CPU (gloo) through the real CLI and torchrun: every strategy must reproduce the
single-process run, survive a killed rank, and resume at another world size without losing or
repeating a sample."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from launch.sweep import link_shared_data
from pipeline.plots import read_jsonl
from pipeline.run_dir import RunDir
from pipeline.tokenized import open_split
from pipeline.train.data import SampleOrder, collate_table
from tests import fixtures
from tests.helpers import assert_close_weights, ftpipe, losses, manifest, weights
from tests.processes import kill_tree, output, rank_pid, start_run, wait_for_file, wait_for_lines

pytestmark = pytest.mark.multirank

STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "zero1": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}},
    "zero2": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}},
    "zero3_offload": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu",
                                                             "offload_params": "cpu"}},
}
TWO_RANKS = {"backend": "torchrun", "nproc_per_node": 2}
HELD_OUT = {"eval_every": 3}  # scored at steps 3 and 5 (the last); how, not what, is trained
# The same global batch (8) on one rank (grad_accum 4) and on two (grad_accum 2).
BATCH = {"max_steps": 5, "micro_batch_size": 2, "global_batch_size": 8, "lr": 1e-3, "checkpoint_every": 5}


def _config(tmp: Path, model: Path, data: Path, name: str, train: dict, launch: dict | None = None) -> Path:
    """A run of `name` whose shard/ and tokenize/ link to the module's one prepared dataset (as a sweep
    member's do): every run here trains on the same tokenized rows, prepared once."""
    cfg = fixtures.causal_config(tmp, model, data, name=name, train={**BATCH, **train})
    cfg["launch"] = launch or {}
    cfg["evaluate"] = {"batch_size": 8, "num_generations": 0}
    if name != DATA_RUN:
        link_shared_data(RunDir(tmp / "runs" / DATA_RUN), RunDir(tmp / "runs" / name))
    return fixtures.write_config(tmp / f"{name}.yaml", cfg)


DATA_RUN = "data"
TRAINED = ("--stages", "train,consolidate", "--no-progress")  # what these tests compare; evaluate has its own


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    data = fixtures.write_jsonl(tmp / "text.jsonl", [{"text": s} for s in fixtures.sentences(160)])
    config = _config(tmp, tiny_llama, data, DATA_RUN, {})
    assert ftpipe("run", config, "--stages", "shard,tokenize", "--no-progress") == 0
    return tmp, data


@pytest.fixture(scope="module")
def single_run(workspace, tiny_llama) -> Path:
    tmp, data = workspace
    assert ftpipe("run", _config(tmp, tiny_llama, data, "single", HELD_OUT), *TRAINED) == 0
    return tmp / "runs" / "single"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_ranks_match_the_single_process_run(workspace, tiny_llama, single_run, name):
    tmp, data = workspace
    config = _config(tmp, tiny_llama, data, name, {**STRATEGIES[name], **HELD_OUT}, TWO_RANKS)
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
def packed_single(workspace, tiny_llama) -> Path:
    tmp, data = workspace
    config = _packed_config(tmp, tiny_llama, data, "packed-single", {}, None)
    assert ftpipe("run", config, "--stages", "shard,tokenize,train", "--no-progress") == 0
    return tmp / "runs" / "packed-single"


@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_packed_rows_in_attention_tiles_train_on_two_ranks_as_on_one(workspace, tiny_llama, packed_single,
                                                                     name):
    """The tiles' layout reaches the attention through FSDP2's and DeepSpeed's wrappers as forward
    keyword arguments (train/tiled_attention.py)."""
    tmp, data = workspace
    rows = open_split(packed_single / "tokenize" / "train")
    assert all("tile_mask" in collate_table(rows.slice(start, 2), 0) for start in range(0, 16, 2))
    config = _packed_config(tmp, tiny_llama, data, f"packed-{name}", STRATEGIES[name], TWO_RANKS)
    assert ftpipe("run", config, "--stages", "train", "--no-progress") == 0
    assert losses(tmp / "runs" / f"packed-{name}") == pytest.approx(losses(packed_single), rel=1e-4)

LONG_FSDP = {**STRATEGIES["fsdp"], "max_steps": 40, "checkpoint_every": 4, "keep_last": 20}


@pytest.fixture(scope="module")
def fsdp_whole(workspace, tiny_llama) -> Path:
    """40 uninterrupted FSDP steps on two ranks: what interrupted runs must end up equal to."""
    tmp, data = workspace
    config = _config(tmp, tiny_llama, data, "fsdp-whole", LONG_FSDP, TWO_RANKS)
    assert ftpipe("run", config, *TRAINED) == 0
    return tmp / "runs" / "fsdp-whole"


def _finish(process) -> None:
    try:
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process)


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(workspace, tiny_llama, fsdp_whole):
    tmp, data = workspace
    killed = _config(tmp, tiny_llama, data, "fsdp-killed", LONG_FSDP, {**TWO_RANKS, "max_restarts": 1})
    process = start_run(killed, *TRAINED)
    checkpoints = tmp / "runs" / "fsdp-killed" / "train" / "checkpoints"
    wait_for_file(checkpoints / "step-000008" / "COMPLETE", process)
    os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
    _finish(process)
    assert process.returncode == 0, output(process)[-3000:]
    run = tmp / "runs" / "fsdp-killed"
    assert manifest(run, "train")["resumed_from_step"] >= 8
    assert losses(run) == pytest.approx(losses(fsdp_whole), rel=1e-5)
    assert_close_weights(weights(run), weights(fsdp_whole), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,receiver,signum", [("fsdp", "launcher", signal.SIGTERM),
                                                  ("zero3", "rank 1", signal.SIGUSR2)])
def test_a_stop_signal_saves_every_rank_and_the_rerun_resumes_exactly(workspace, tiny_llama, fsdp_whole,
                                                                      name, receiver, signum):
    """SLURM's --signal (SIGUSR2), or SIGTERM (preemption, scancel, kill), reaches the launcher or any one
    rank: all ranks save the same step together, the run stops with exit code 75, and running again
    loses and repeats nothing. The launcher passes SIGTERM on to torchrun too, which must not turn it
    into killing its ranks."""
    tmp, data = workspace
    train = {**LONG_FSDP, **STRATEGIES[name], "checkpoint_every": 1000, "sample_ledger": True}
    config = _config(tmp, tiny_llama, data, f"stop-{name}", train, TWO_RANKS)
    run = tmp / "runs" / f"stop-{name}"
    process = start_run(config, *TRAINED)
    wait_for_lines(run / "train" / "metrics.jsonl", 5, process)
    os.kill(process.pid if receiver == "launcher" else rank_pid(process.pid, 1), signum)
    _finish(process)
    assert process.returncode == 75, output(process)[-3000:]
    assert f"stopped on {signum.name} at step" in output(process) and "Traceback" not in output(process)
    assert not (run / "train" / "manifest.json").exists()
    saved = sorted((run / "train" / "checkpoints").glob("step-*/COMPLETE"))
    assert len(saved) == 1, "the stop writes exactly one checkpoint"
    stopped_at = int(saved[0].parent.name.split("-")[1])
    assert 5 <= stopped_at < 40
    assert ftpipe("run", config, *TRAINED) == 0
    assert manifest(run, "train")["resumed_from_step"] == stopped_at
    table = open_split(run / "tokenize" / "train")
    expected = SampleOrder(table.num_rows, seed=0).rows(0, 40 * BATCH["global_batch_size"])
    counts = Counter(int(r) for r in expected)
    assert Counter(_ledger_rows(run)) == counts, "a sample was lost or trained twice"
    if name == "fsdp":
        assert losses(run) == pytest.approx(losses(fsdp_whole), rel=1e-5)
        assert_close_weights(weights(run), weights(fsdp_whole), rtol=1e-5, atol=1e-6)


def _ledger_rows(run: Path) -> list[int]:
    rows: list[int] = []
    for path in sorted((run / "train" / "ledger").glob("rank-*.jsonl")):
        rows += [r for line in path.read_text().splitlines() for r in json.loads(line)["rows"]]
    return rows


@pytest.mark.parametrize("name,before,after", [
    ("fsdp", TWO_RANKS, {}),                      # 2 ranks -> 1
    ("zero2", {}, TWO_RANKS),                     # 1 rank -> 2
    ("zero3", TWO_RANKS, {}),
])
def test_resume_at_another_world_size_loses_and_repeats_no_sample(workspace, tiny_llama, name, before, after):
    tmp, data = workspace
    train = {**STRATEGIES[name], "max_steps": 12, "checkpoint_every": 3, "sample_ledger": True,
             "keep_last": 10}
    config = _config(tmp, tiny_llama, data, f"ws-{name}", train, before)
    process = start_run(config, "--stages", "train")
    run = tmp / "runs" / f"ws-{name}"
    wait_for_file(run / "train" / "checkpoints" / "step-000006" / "COMPLETE", process)
    kill_tree(process)
    assert not (run / "train" / "manifest.json").exists()
    moved = [f"launch.{k}={v}" for k, v in (after or {"backend": "local", "nproc_per_node": 1}).items()]
    assert ftpipe("run", config, "--stages", "train", "--no-progress", *moved) == 0
    assert manifest(run, "train")["resumed_from_step"] >= 6
    assert manifest(run, "train")["world_size"] == (2 if after else 1)
    table = open_split(run / "tokenize" / "train")
    expected = SampleOrder(table.num_rows, seed=0).rows(0, 12 * BATCH["global_batch_size"])
    trained = _ledger_rows(run)
    assert Counter(trained) == Counter(int(r) for r in expected), "a sample was lost or trained twice"


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
def test_lora_and_freezing_work_with_every_strategy(workspace, tiny_llama, partial, name):
    tmp, data = workspace
    single = tmp / "runs" / f"{partial}-single"
    if not (single / "evaluate" / "manifest.json").exists():
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
