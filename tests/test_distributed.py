"""Two ranks on CPU (gloo) through the real CLI and torchrun: every strategy must reproduce the
single-process run, survive a killed rank, and resume at another world size without losing or
repeating a sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.tokenize import open_split
from pipeline.train.data import SampleOrder
from tests import fixtures
from tests.helpers import REPO, assert_close_weights, ftpipe, losses, manifest, weights

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
# The same global batch (8) on one rank (grad_accum 4) and on two (grad_accum 2).
BATCH = {"max_steps": 5, "micro_batch_size": 2, "global_batch_size": 8, "lr": 1e-3, "checkpoint_every": 5}


def _config(tmp: Path, model: Path, data: Path, name: str, train: dict, launch: dict | None = None) -> Path:
    cfg = fixtures.causal_config(tmp, model, data, name=name, train={**BATCH, **train})
    cfg["launch"] = launch or {}
    cfg["evaluate"] = {"batch_size": 8, "num_generations": 0}
    return fixtures.write_config(tmp / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    data = fixtures.write_jsonl(tmp / "text.jsonl", [{"text": s} for s in fixtures.sentences(160)])
    return tmp, data


@pytest.fixture(scope="module")
def single_run(workspace, tiny_llama) -> Path:
    tmp, data = workspace
    assert ftpipe("run", _config(tmp, tiny_llama, data, "single", {}), "--no-progress") == 0
    return tmp / "runs" / "single"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_ranks_match_the_single_process_run(workspace, tiny_llama, single_run, name):
    tmp, data = workspace
    assert ftpipe("run", _config(tmp, tiny_llama, data, name, STRATEGIES[name], TWO_RANKS), "--no-progress") == 0
    run = tmp / "runs" / name
    assert manifest(run, "train")["world_size"] == 2
    assert losses(run)[:5] == pytest.approx(losses(single_run)[:5], rel=1e-4)
    assert_close_weights(weights(run), weights(single_run), rtol=1e-4, atol=1e-5)
    assert manifest(run, "consolidate")["verify_max_abs_diff"] <= 1e-4


def _start(config: Path, *overrides: str) -> subprocess.Popen:
    # Output goes to a file: an unread pipe would fill up and block the ranks.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(config.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", str(config), "--no-progress", *overrides],
                               env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    process.log_path = Path(log.name)
    return process


def _output(process: subprocess.Popen) -> str:
    return process.log_path.read_text()


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, _output(process)
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descendants(root: int) -> list[int]:
    """Processes below `root` (torchrun starts its workers in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            while pid > 1 and pid != root:
                pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            continue
        if pid == root:
            found.append(int(entry.name))
    return found


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the run and every rank: torchrun's workers live in their own sessions."""
    for pid in [*_descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _rank_pid(root: int, rank: int) -> int:
    """The worker process of `rank` started under `root`."""
    for pid in _descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"launch.worker" in cmdline and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank}")


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(workspace, tiny_llama):
    tmp, data = workspace
    train = {**STRATEGIES["fsdp"], "max_steps": 40, "checkpoint_every": 4, "keep_last": 20}
    whole = _config(tmp, tiny_llama, data, "fsdp-whole", train, TWO_RANKS)
    killed = _config(tmp, tiny_llama, data, "fsdp-killed", train, {**TWO_RANKS, "max_restarts": 1})
    assert ftpipe("run", whole, "--no-progress") == 0
    process = _start(killed)
    _wait_for(tmp / "runs" / "fsdp-killed" / "train" / "checkpoints" / "step-000008" / "COMPLETE", process)
    os.kill(_rank_pid(process.pid, 1), signal.SIGKILL)
    try:
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            _kill_tree(process)
    assert process.returncode == 0, _output(process)[-3000:]
    run = tmp / "runs" / "fsdp-killed"
    assert manifest(run, "train")["resumed_from_step"] >= 8
    assert losses(run) == pytest.approx(losses(tmp / "runs" / "fsdp-whole"), rel=1e-5)
    assert_close_weights(weights(run), weights(tmp / "runs" / "fsdp-whole"), rtol=1e-5, atol=1e-6)


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
    train = {**STRATEGIES[name], "max_steps": 12, "checkpoint_every": 3, "sample_ledger": True, "keep_last": 10}
    config = _config(tmp, tiny_llama, data, f"ws-{name}", train, before)
    process = _start(config)
    run = tmp / "runs" / f"ws-{name}"
    _wait_for(run / "train" / "checkpoints" / "step-000006" / "COMPLETE", process)
    _kill_tree(process)
    assert not (run / "train" / "manifest.json").exists()
    moved = [f"launch.{k}={v}" for k, v in (after or {"backend": "local", "nproc_per_node": 1}).items()]
    assert ftpipe("run", config, "--no-progress", *moved) == 0
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
    return fixtures.write_config(tmp / f"{name}.yaml", cfg)


@pytest.mark.parametrize("partial,name", [("lora", "fsdp"), ("lora", "zero3"), ("freeze", "ddp"),
                                          ("freeze", "zero2")])
def test_lora_and_freezing_work_with_every_strategy(workspace, tiny_llama, partial, name):
    tmp, data = workspace
    single = tmp / "runs" / f"{partial}-single"
    if not (single / "evaluate" / "manifest.json").exists():
        assert ftpipe("run", _partial_config(tmp, tiny_llama, data, f"{partial}-single", partial, {}),
                      "--no-progress") == 0
    config = _partial_config(tmp, tiny_llama, data, f"{partial}-{name}", partial, STRATEGIES[name], TWO_RANKS)
    assert ftpipe("run", config, "--no-progress") == 0
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
