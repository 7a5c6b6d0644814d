"""Process set-up shared by every ftpipe entry point (CLI, torchrun ranks, SLURM jobs and array
tasks): ftpipe's log handler, quiet third-party libraries, DeepSpeed's accelerator chosen just before
DeepSpeed is first imported."""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.context import PROGRESS_LOGGER
from pipeline.errors import StagePreempted, UserError
from pipeline.run_dir import os_error_line

STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; running again resumes
DEBUG_ENV = "FTPIPE_DEBUG"  # set by `ftpipe --debug`; torchrun ranks and SLURM jobs inherit it


class _CurrentStreamHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr (or sys.stdout) is now: tests and notebooks swap them."""

    def __init__(self, name: str = "stderr"):
        super().__init__()
        self.name_of_stream = name

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _BeforeDeepSpeed(importlib.abc.MetaPathFinder):
    """Picks DeepSpeed's accelerator just before the first `import deepspeed` (ours or transformers'),
    which would otherwise warn: the choice needs torch, whose import commands that never train skip."""

    done = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        # Stays in sys.meta_path: removing itself here would skip the next finder of this very search.
        if name == "deepspeed" and not self.done:
            self.done = True
            from pipeline.distributed import prepare_accelerator_env

            prepare_accelerator_env()
        return None  # the usual finders import it


def quiet_libraries() -> None:
    root = logging.getLogger("ftpipe")
    if not root.handlers:
        handler = _CurrentStreamHandler()
        handler.setFormatter(logging.Formatter("ftpipe: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    # Progress (stage start and end, a line per logged training step) is the run's output: stdout.
    progress = logging.getLogger(PROGRESS_LOGGER)
    if not progress.handlers:
        progress.addHandler(_CurrentStreamHandler("stdout"))
        progress.propagate = False
    for name in ("alembic", "mlflow", "urllib3", "httpx", "datasets", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not any(isinstance(finder, _BeforeDeepSpeed) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeDeepSpeed())
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if "transformers" in sys.modules:  # it reads these variables only when imported
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    else:  # importing transformers here would cost commands like `ftpipe status` a second
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def reporting_errors(command: Callable[[], int],
                     on_user_error: Callable[[UserError], None] | None = None) -> int:
    """Run an entry point's command; a user's mistake is one line on stderr and exit code 2, a stop
    after a checkpoint is exit code 75 (running again resumes), never a traceback (unless FTPIPE_DEBUG=1,
    which `--debug` sets: then the traceback comes before the line). So is a file the system refused
    (permissions, a full disk, a read-only filesystem): one line naming it."""
    try:
        return command()
    except (UserError, OSError) as caught:
        err = caught if isinstance(caught, UserError) else UserError(os_error_line(caught))
        if on_user_error is not None:
            on_user_error(err)
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc(file=sys.stderr)
        for line in str(err).splitlines() or [""]:  # several config mistakes: one line each
            print(f"ftpipe: error: {line}", file=sys.stderr)
        return 2
    except StagePreempted as stopped:
        print(f"ftpipe: {stopped}", file=sys.stderr)
        return STOPPED_EXIT
    except KeyboardInterrupt:
        print("ftpipe: interrupted", file=sys.stderr)
        return 130
