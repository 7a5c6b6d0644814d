"""shard and tokenize on SLURM as job arrays, datatrove style.

Each stage's work is a list of tasks `run_shard(cfg, run_dir, rank, world_size)` (shard: one per
source file; tokenize: one per shard piece), the same function the local process pool runs. An
array task takes every k-th pending rank; each rank leaves its own completion marker, so a killed
array task costs only its ranks, and a resubmitted array holds only the ranks without a current
marker. The stage's own job (afterok on its array) then finds every marker current, merges, and
writes the manifest, exactly as `ftpipe run` would.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import submitit

from pipeline.config import RunConfig, load_config

ARRAY_STAGES = {"shard": "pipeline.shard", "tokenize": "pipeline.tokenize"}


def enter_job(run_dir: Path, cwd: Path) -> RunConfig:
    """What every job function does first: work where `ftpipe submit` ran (config paths are
    relative to it), quiet the libraries, read the run's config."""
    from launch.process import quiet_libraries

    os.chdir(cwd)
    quiet_libraries()
    return load_config(Path(run_dir) / "config.yaml")


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(ARRAY_STAGES[stage])


def pending_ranks(cfg: RunConfig, run_dir: Path, stage: str, upstream_redone: bool) -> list[int]:
    """Ranks an array must run: those without a current marker; all when the stage before it is
    redone too (its output, which the markers are checked against, will change)."""
    module = stage_module(stage)
    if upstream_redone:
        return list(range(module.task_count(cfg, run_dir)))
    return module.pending_tasks(cfg, run_dir)


def task_groups(ranks: list[int], max_tasks: int) -> list[list[int]]:
    """At most max_tasks groups, task i taking ranks i, i+k, i+2k, ... of the pending list."""
    count = min(max_tasks, len(ranks))
    return [ranks[i::count] for i in range(count)]


class ArrayTask(submitit.helpers.Checkpointable):
    """One array task: (run_dir, stage, cwd) picklable; called with its ranks. Requeued as is."""

    def __init__(self, run_dir: str, stage: str, cwd: str):
        self.run_dir, self.stage, self.cwd = run_dir, stage, cwd

    def __call__(self, ranks: list[int] | None = None) -> list[int]:
        """Run `ranks` (None: this task's share of all ranks, from SLURM_ARRAY_TASK_ID/COUNT)."""
        run_dir = Path(self.run_dir)
        cfg = enter_job(run_dir, Path(self.cwd))
        module = stage_module(self.stage)
        world_size = module.task_count(cfg, run_dir)
        if ranks is None:  # a script written by hand or by --dry-run: ranks done already skip on their markers
            task, count = int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
            ranks = list(range(world_size))[task::count]
        for rank in ranks:
            module.run_shard(cfg, run_dir, rank, world_size)
        return ranks
