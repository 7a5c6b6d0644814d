"""MLflow tracking that cannot stop training.

Every call goes through one background thread: a slow or unreachable tracking server delays only
that thread, and the first failure turns tracking off with one warning while the run goes on.
One parent run per `ftpipe run`, one nested run per stage that runs. Jobs submitted to SLURM attach
to a parent that `ftpipe submit` created (RUN_DIR/slurm/mlflow.json), so one submitted run (or one
sweep) is one parent in MLflow however many jobs it takes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.run_dir import RunDir, atomic_write_json

log = logging.getLogger("ftpipe.tracking")
FLUSH_TIMEOUT_S = 60.0


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(obj)[:6000]}


class _Worker:
    """Runs queued calls in order on a daemon thread; gives up for good after the first error."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.failed = False
        self.thread = threading.Thread(target=self._loop, name="ftpipe-mlflow", daemon=True)
        self.thread.start()

    def submit(self, call: Callable[[], Any]) -> None:
        if not self.failed:
            self.queue.put(call)

    def _loop(self) -> None:
        while (call := self.queue.get()) is not None:
            if self.failed:
                continue
            try:
                call()
            except Exception as err:  # noqa: BLE001 - tracking must never take training down
                self.failed = True
                log.warning("MLflow tracking disabled after an error: %s", str(err).splitlines()[0])

    def close(self, timeout: float) -> bool:
        self.queue.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()


class StageRun:
    """A nested MLflow run; the run id is filled in by the worker when it is created."""

    def __init__(self, tracker: Tracker, name: str):
        self.tracker = tracker
        self.name = name
        self.run_id: str | None = None

    def wait_for_id(self, timeout: float = FLUSH_TIMEOUT_S) -> str | None:
        """The run id once the background thread has created the run; None if tracking failed."""
        created = threading.Event()
        self.tracker.submit(created.set)
        deadline = time.monotonic() + timeout
        while not created.wait(0.2) and not self.tracker.failed and time.monotonic() < deadline:
            pass
        return None if self.tracker.failed else self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tracker.submit(lambda: self.tracker.log_batch(self.run_id, metrics, step))

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.submit(lambda: self.tracker.log_params_now(self.run_id, params))

    def finish(self, status: str, manifest_path: Path | None = None) -> None:
        def call() -> None:
            client = self.tracker.client
            if manifest_path is not None and manifest_path.is_file():
                client.log_artifact(self.run_id, str(manifest_path), artifact_path=self.name)
            client.set_terminated(self.run_id, status=status)
        self.tracker.submit(call)


class Tracker:
    """The MLflow side of one pipeline run."""

    def __init__(self, uri: str, experiment: str, run_name: str, artifact_root: Path | None = None):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.artifact_root = artifact_root
        self.parent_id: str | None = None
        self.client = None
        self.worker = _Worker()

    def submit(self, call: Callable[[], Any]) -> None:
        self.worker.submit(call)

    def start(self, params: dict[str, Any], config_file: Path, tags: dict[str, str],
              attach_to: str | None = None) -> None:
        """Create the parent run, or with `attach_to` continue that one (a submitted run's jobs)."""
        def call() -> None:
            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import
            self.client = MlflowClient(tracking_uri=self.uri)
            if attach_to:
                self.parent_id = attach_to
                return
            experiment_id = self._experiment_id()
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.parent_id = run.info.run_id
            self.log_params_now(self.parent_id, flatten(params))
            self.client.log_artifact(self.parent_id, str(config_file))
        self.submit(call)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def stage(self, name: str, params: dict[str, Any]) -> StageRun:
        stage = StageRun(self, name)

        def call() -> None:
            tags = {"mlflow.parentRunId": self.parent_id, "ftpipe.stage": name}
            run = self.client.create_run(self._experiment_id(), run_name=name, tags=tags)
            stage.run_id = run.info.run_id
            self.log_params_now(stage.run_id, flatten(params))
        self.submit(call)
        return stage

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        self.submit(lambda: self.log_batch(self.parent_id, metrics, None))

    def set_tag(self, key: str, value: str) -> None:
        self.submit(lambda: self.client.set_tag(self.parent_id, key, value))

    def log_batch(self, run_id: str, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=entries)

    def log_params_now(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(entries), 100):
            self.client.log_batch(run_id, params=entries[start:start + 100])

    def close(self, status: str | None) -> bool:
        """Flush; end the parent run with `status` (None leaves it running for later jobs)."""
        if status is not None:
            self.submit(lambda: self.client.set_terminated(self.parent_id, status=status))
        done = self.worker.close(FLUSH_TIMEOUT_S)
        if not done:
            log.warning("MLflow did not answer within %.0fs; some tracking data was not sent",
                        FLUSH_TIMEOUT_S)
        return done and not self.worker.failed

    @property
    def failed(self) -> bool:
        return self.worker.failed


def create_parent_run(tracker: Tracker, params: dict[str, Any], config_file: Path,
                      tags: dict[str, str]) -> str | None:
    """Create the parent run now and leave it running; None (after one warning) if MLflow fails."""
    tracker.start(params, config_file, tags)
    done = tracker.close(None)
    return tracker.parent_id if done else None


def write_parent(run_dir: RunDir, uri: str, run_id: str) -> None:
    atomic_write_json(run_dir.mlflow_parent_file, {"uri": uri, "run_id": run_id})


def read_parent(run_dir: RunDir, uri: str) -> str | None:
    """The parent run recorded for this run directory on the same tracking store, if any."""
    try:
        found = json.loads(run_dir.mlflow_parent_file.read_text())
    except (OSError, ValueError):
        return None
    return found.get("run_id") if found.get("uri") == uri else None


class AttachedStageRun:
    """A stage run created by the pipeline process, logged to from another process (a torchrun
    rank): same background thread and same give-up-on-first-error rule."""

    def __init__(self, uri: str, run_id: str):
        self.run_id = run_id
        self.worker = _Worker()
        self.client = None

        def connect() -> None:
            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)
            self.client = MlflowClient(tracking_uri=uri)
        self.worker.submit(connect)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.worker.submit(lambda: Tracker.log_batch(self, self.run_id, metrics, step))

    def log_params(self, params: dict[str, Any]) -> None:
        self.worker.submit(lambda: Tracker.log_params_now(self, self.run_id, params))

    def close(self) -> bool:
        done = self.worker.close(FLUSH_TIMEOUT_S)
        return done and not self.worker.failed


def build_tracker(cfg: RunConfig, environ: dict[str, str] | None = None) -> Tracker | None:
    """The run's tracker: tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else sqlite in output_dir."""
    if not cfg.tracking.enabled:
        return None
    environ = os.environ if environ is None else environ
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.mlflow_uri or environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output_dir)
    artifacts = output_dir / "mlartifacts" if uri.startswith("sqlite:") else None
    return Tracker(uri, cfg.tracking.experiment or cfg.name, cfg.name, artifacts)
