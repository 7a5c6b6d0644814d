"""What a stage is given besides its config: where to write, which rank it is, where to report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.run_dir import RunDir


class StageTracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...


class NullStageTracker:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
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
