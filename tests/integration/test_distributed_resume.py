"""Two ranks on CPU (gloo) through the real CLI and torchrun: a killed rank is restarted, a stop signal
saves every rank, and a run resumes at another world size, each without losing or repeating a sample."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from pipeline.tokenized import open_split
from pipeline.train.data import SampleOrder
from tests.helpers import assert_close_weights, ftpipe, losses, manifest, weights
from tests.integration.distributed_runs import (
    BATCH,
    STRATEGIES,
    TRAINED,
    TWO_RANKS,
    run_config,
)
from tests.processes import kill_tree, output, rank_pid, start_run, wait_for_file, wait_for_lines

pytestmark = pytest.mark.multirank


LONG_FSDP = {**STRATEGIES["fsdp"], "max_steps": 40, "checkpoint_every": 4, "keep_last": 20}


@pytest.fixture(scope="module")
def fsdp_whole(dist_workspace, tiny_llama) -> Path:
    """40 uninterrupted FSDP steps on two ranks: what interrupted runs must end up equal to."""
    tmp, data = dist_workspace
    config = run_config(tmp, tiny_llama, data, "fsdp-whole", LONG_FSDP, TWO_RANKS)
    assert ftpipe("run", config, *TRAINED) == 0
    return tmp / "runs" / "fsdp-whole"


def _finish(process) -> None:
    try:
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process)


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(dist_workspace, tiny_llama,
                                                                          fsdp_whole):
    tmp, data = dist_workspace
    killed = run_config(tmp, tiny_llama, data, "fsdp-killed", LONG_FSDP, {**TWO_RANKS, "max_restarts": 1})
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
def test_a_stop_signal_saves_every_rank_and_the_rerun_resumes_exactly(dist_workspace, tiny_llama, fsdp_whole,
                                                                      name, receiver, signum):
    """SLURM's --signal (SIGUSR2), or SIGTERM (preemption, scancel, kill), reaches the launcher or any one
    rank: all ranks save the same step together, the run stops with exit code 75, and running again
    loses and repeats nothing. The launcher passes SIGTERM on to torchrun too, which must not turn it
    into killing its ranks."""
    tmp, data = dist_workspace
    train = {**LONG_FSDP, **STRATEGIES[name], "checkpoint_every": 1000, "sample_ledger": True}
    config = run_config(tmp, tiny_llama, data, f"stop-{name}", train, TWO_RANKS)
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
def test_resume_at_another_world_size_loses_and_repeats_no_sample(dist_workspace, tiny_llama, name, before,
                                                                  after):
    tmp, data = dist_workspace
    train = {**STRATEGIES[name], "max_steps": 12, "checkpoint_every": 3, "sample_ledger": True,
             "keep_last": 10}
    config = run_config(tmp, tiny_llama, data, f"ws-{name}", train, before)
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
