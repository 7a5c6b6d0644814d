"""shard and tokenize on SLURM as job arrays, datatrove style.

Each unit-wise stage's work is a list of units (shard: one per source file; tokenize: one per shard
piece), run by `pipeline.units.run_task(unit_stage, cfg, run_dir, rank, world_size)`, the function
the local process pool runs too. An array task takes every k-th pending rank; each rank leaves its
own completion marker, so a killed array task costs only its ranks, and a resubmitted array holds
only the ranks without a current marker. The stage's own job (afterok on its array) then finds every
marker current, merges, and writes the manifest, exactly as `ftpipe run` would.
"""

from __future__ import annotations

import os
from pathlib import Path

import submitit

from launch.run_lock import holding, this_job
from pipeline import units
from pipeline.config import RunConfig, load_config
from pipeline.run_dir import RunDir
from pipeline.stages import STAGES


def enter_job(run_dir: Path, cwd: Path) -> RunConfig:
    """What every job function does first: work where `ftpipe submit` ran (config paths are
    relative to it), quiet the libraries, read the run's config."""
    from launch.process import quiet_libraries

    os.chdir(cwd)
    quiet_libraries()
    return load_config(RunDir(Path(run_dir)).config_file)


def task_count(cfg: RunConfig, run_dir: RunDir, stage: str) -> int:
    """How many ranks (units) the unit-wise `stage` has, known before the stages upstream ran."""
    return STAGES[stage].unit_stage().task_count(cfg, run_dir)


def pending_ranks(cfg: RunConfig, run_dir: RunDir, stage: str, upstream_redone: bool) -> list[int]:
    """Ranks an array must run: those without a current marker; all when the stage before it is
    redone too (its output, which the markers are checked against, will change)."""
    if upstream_redone:
        return list(range(task_count(cfg, run_dir, stage)))
    return units.pending(STAGES[stage].unit_stage(), cfg, run_dir)


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
        run_dir = RunDir(Path(self.run_dir))
        cfg = enter_job(run_dir.root, Path(self.cwd))
        unit_stage = STAGES[self.stage].unit_stage()
        world_size = unit_stage.task_count(cfg, run_dir)
        # a script written by hand or by --dry-run: ranks done already skip on their markers
        if ranks is None:
            task, count = int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
            ranks = list(range(world_size))[task::count]
        # The array's tasks, running at once, share its lock; it ends with the array (the stage's own
        # job then takes it over).
        with holding(run_dir, this_job(), keep=True):
            for rank in ranks:
                units.run_task(unit_stage, cfg, run_dir, rank, world_size)
        return ranks
