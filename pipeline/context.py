"""What a stage is given besides its config: where to write, which rank it is, where to report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.run_dir import RunDir


class StageTracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, path: Path) -> None: ...


class NullStageTracker:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_table(self, path: Path) -> None:
        pass


@dataclass
class StageContext:
    run_dir: RunDir
    rank: int = 0
    world_size: int = 1
    tracker: StageTracker = field(default_factory=NullStageTracker)
    progress: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def stamp() -> str:
    """The time as log lines show it (a SLURM log has no timestamps of its own)."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def clock(seconds: float) -> str:
    """A duration as H:MM:SS."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# Stage start and end lines and one line per logged training step; ftpipe's command line prints them on
# stdout. Route them elsewhere with logging.getLogger("ftpipe.progress").
PROGRESS_LOGGER = "ftpipe.progress"
progress_log = logging.getLogger(PROGRESS_LOGGER)
