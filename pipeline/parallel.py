"""Run a stage's per-shard tasks in worker processes, datatrove style.

A task is `fn(cfg, run_dir, rank, world_size)`: everything it needs is derived from the config and
the run directory, so the same call works in a local process pool, in this process, or later as
one SLURM array task (rank = SLURM_ARRAY_TASK_ID). The data stages' task is pipeline.units.run_task:
each writes its own outputs and completion marker; a killed run redoes only the tasks without one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.run_dir import RunDir

Task = Callable[[RunConfig, RunDir, int, int], Any]


@dataclass(frozen=True)
class Done:
    rank: int
    result: Any
    pid: int  # the process that ran it: logs, and tests that kill a worker


def _one_thread_each() -> None:
    # N workers on N cores: each fast tokenizer spinning up its own thread pool on every core
    # oversubscribes the machine (docs/benchmarks.md, tokenize: worker threads and the cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"


def usable_cores() -> int:
    """The cores this process may run on (a SLURM or cgroup CPU set), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _rust_calls_stay_on_their_thread(workers: int) -> Iterator[None]:
    """With a worker thread per core, each Rust tokenizer call runs on the thread that made it
    rather than on a pool over every core: the threads already fill the cores (docs/benchmarks.md,
    tokenize: worker threads and the cores). tokenizers reads the variable at every call; the old
    value is back after."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    if workers >= usable_cores():
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _call(fn: Task, cfg: RunConfig, run_dir: RunDir, rank: int, world_size: int) -> tuple[Any, int]:
    return fn(cfg, run_dir, rank, world_size), os.getpid()


def _pool(workers: int, threads: bool) -> Executor:
    if threads:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftpipe-task")
    # spawn: workers start clean (no copied locks, tokenizer threads or tracking threads of the parent).
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread_each)


def run_tasks(fn: Task, cfg: RunConfig, run_dir: RunDir, ranks: list[int], world_size: int,
              workers: int, threads: bool = False) -> Iterator[Done]:
    """Yield each rank's result as it finishes; one worker (or one task) runs here, in order.
    `threads`: workers are threads of this process, for tasks whose heavy part releases the GIL."""
    if workers <= 1 or len(ranks) <= 1:
        for rank in ranks:
            yield Done(rank, fn(cfg, run_dir, rank, world_size), os.getpid())
        return
    workers = min(workers, len(ranks))
    # The pool closes (its threads done) before the variable is restored.
    with _rust_calls_stay_on_their_thread(workers if threads else 0), _pool(workers, threads) as pool:
        pending: dict[Future, int] = {pool.submit(_call, fn, cfg, run_dir, r, world_size): r for r in ranks}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=pending.get):
                    result, pid = future.result()
                    yield Done(pending.pop(future), result, pid)
        except BrokenProcessPool:
            raise UserError("a worker process died (killed, or out of memory); rerun to redo only the "
                            "shards it did not finish") from None
        finally:
            for future in pending:
                future.cancel()
