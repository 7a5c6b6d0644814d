"""One rank of a stage started by torchrun (or srun): `python -m launch.worker RUN_DIR STAGE`.

What a worker gets is the small picklable spec (run directory + stage name); the config comes
from the run directory, which the pipeline process wrote before launching.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.errors import StagePreempted, UserError

RESULT_FILE = ".result.json"
ERROR_FILE = ".error.txt"
STOPPED_FILE = ".stopped.txt"  # the stage stopped on a signal after a complete checkpoint
RUN_ID_ENV = "FTPIPE_MLFLOW_RUN_ID"
URI_ENV = "FTPIPE_MLFLOW_URI"


def run_rank(run_dir: Path, stage: str, progress: bool = True) -> dict | None:
    """Run `stage` as this rank; rank 0 leaves the result (or why it stopped) for the launcher."""
    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.context import NullStageTracker, StageContext
    from pipeline.run_dir import RunDir, atomic_write_json, atomic_write_text
    from pipeline.runner import SPECS

    cfg = load_config(run_dir / "config.yaml")
    rank = int(os.environ.get("RANK", "0"))
    tracker = _tracker() if rank == 0 else None
    ctx = StageContext(RunDir(run_dir), rank, int(os.environ.get("WORLD_SIZE", "1")),
                       tracker or NullStageTracker(), progress)
    result, stopped = None, None
    try:
        result = SPECS[stage].run(cfg, ctx)
    except StagePreempted as err:
        stopped = str(err)
    finally:
        if tracker is not None:
            tracker.close()
    distributed.shutdown()
    if rank == 0 and stopped is not None:
        atomic_write_text(RunDir(run_dir).stage(stage) / STOPPED_FILE, stopped)
    elif rank == 0:
        atomic_write_json(RunDir(run_dir).stage(stage) / RESULT_FILE, result)
    return result


def _tracker():
    run_id, uri = os.environ.get(RUN_ID_ENV), os.environ.get(URI_ENV)
    if not run_id or not uri:
        return None
    from pipeline.tracking import AttachedStageRun

    return AttachedStageRun(uri, run_id)


def main(argv: list[str] | None = None) -> int:
    from launch.process import quiet_libraries

    argv = sys.argv[1:] if argv is None else argv
    run_dir, stage = Path(argv[0]), argv[1]
    quiet_libraries()
    try:
        run_rank(run_dir, stage, progress="--no-progress" not in argv)
    except UserError as err:
        from pipeline.run_dir import RunDir, atomic_write_text

        atomic_write_text(RunDir(run_dir).stage(stage) / ERROR_FILE, str(err))
        print(f"ftpipe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
