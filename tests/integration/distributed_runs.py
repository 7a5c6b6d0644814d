"""What the two-rank test modules share: the strategies, the batch, and the config of a run that links to
its module's one prepared dataset (`dist_workspace` in conftest.py), as a sweep member's does. Two
modules, not one, so that pytest-xdist can run them in two workers at once (each test file is one group:
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from launch.sweep import link_shared_data
from pipeline.run_dir import RunDir
from tests import fixtures

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
DATA_RUN = "data"
TRAINED = ("--stages", "train,consolidate", "--no-progress")  # what these tests compare; evaluate has its own


def run_config(tmp: Path, model: Path, data: Path, name: str, train: dict,
               launch: dict | None = None) -> Path:
    """A run of `name` whose shard/ and tokenize/ link to the module's one prepared dataset (as a sweep
    member's do): every run here trains on the same tokenized rows, prepared once."""
    cfg = fixtures.causal_config(tmp, model, data, name=name, train={**BATCH, **train})
    cfg["launch"] = launch or {}
    cfg["evaluate"] = {"batch_size": 8, "num_generations": 0}
    if name != DATA_RUN:
        link_shared_data(RunDir(tmp / "runs" / DATA_RUN), RunDir(tmp / "runs" / name))
    return fixtures.write_config(tmp / f"{name}.yaml", cfg)

