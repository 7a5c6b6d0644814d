"""One rank of a stage started by torchrun (or srun): `python -m launch.worker RUN_DIR STAGE`.

What a worker gets is the small picklable spec (run directory + stage name); the config comes
from the run directory, which the pipeline process wrote before launching.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from launch.process import quiet_libraries, reporting_errors
from pipeline.errors import StagePreempted, UserError
from pipeline.run_dir import RunDir, atomic_write_text

RESULT_FILE = ".result.json"
ERROR_FILE = ".error.txt"
STOPPED_FILE = ".stopped.txt"  # the stage stopped on a signal after a complete checkpoint
RUN_ID_ENV = "FTPIPE_MLFLOW_RUN_ID"
RUN_KEY_ENV = "FTPIPE_MLFLOW_RUN_KEY"
URI_ENV = "FTPIPE_MLFLOW_URI"


def run_rank(run_dir: RunDir, stage: str, progress: bool = True) -> dict | None:
    """Run `stage` as this rank; rank 0 leaves the result (or why it stopped) for the launcher. A rank
    that stopped on a signal exits here."""
    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.context import NullStageTracker, StageContext
    from pipeline.run_dir import atomic_write_json
    from pipeline.stages import STAGES

    cfg = load_config(run_dir.config_file)
    rank = int(os.environ.get("RANK", "0"))
    tracker = _tracker(run_dir) if rank == 0 else None
    ctx = StageContext(run_dir, rank, int(os.environ.get("WORLD_SIZE", "1")), tracker or NullStageTracker(),
                       progress)
    result, stopped = None, None
    try:
        result = STAGES[stage].run(cfg, ctx)
    except StagePreempted as err:
        stopped = str(err)
    finally:
        if tracker is not None:
            tracker.close()
    distributed.shutdown()
    if rank == 0 and stopped is not None:
        atomic_write_text(run_dir.stage(stage) / STOPPED_FILE, stopped)
    elif rank == 0:
        atomic_write_json(run_dir.stage(stage) / RESULT_FILE, result)
    if stopped is not None:
        leave_now()
    return result


def _tracker(run_dir: RunDir):
    key, uri = os.environ.get(RUN_KEY_ENV), os.environ.get(URI_ENV)
    if not key or not uri:
        return None
    from pipeline.tracking import AttachedStageRun

    return AttachedStageRun(uri, run_dir, key, os.environ.get(RUN_ID_ENV))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir, stage = RunDir(Path(argv[0])), argv[1]
    quiet_libraries()

    def leave_error(err: UserError) -> None:  # the launcher reports it as the stage's error
        atomic_write_text(run_dir.stage(stage) / ERROR_FILE, str(err))

    def command() -> int:
        run_rank(run_dir, stage, progress="--no-progress" not in argv)
        return 0

    return reporting_errors(command, leave_error)


def leave_now() -> NoReturn:
    """Exit at once after a stop: SIGKILL follows the stop signal within the cluster's KillWait, and
    the interpreter's teardown (torch, threads, modules) took 5-7 s of it on a loaded 2-core machine.
    Everything is written (atomically, fsynced) and the process group is shut down by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
