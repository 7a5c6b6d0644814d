"""MLflow tracking that cannot stop training, and loses nothing when the server goes away.

Every call goes through one background thread as a record (pipeline/tracking_ops.py). A failing
call is retried with backoff (RETRY_DELAYS_S); if the server still does not answer, the record and
every later one go to RUN_DIR/tracking/spool/ (bounded, pipeline/tracking_spool.py), with one try
every PROBE_INTERVAL_S to see whether the server is back; `ftpipe sync RUN_DIR` sends the spool
later. At exit a dead server costs at most EXIT_STALL_S: what is still queued is spooled.
One parent run per `ftpipe run`, one nested run per stage that runs. Jobs submitted to SLURM attach
to a parent that `ftpipe submit` created (RUN_DIR/slurm/mlflow.json), so one submitted run (or one
sweep) is one parent in MLflow however many jobs it takes. Credentials in the tracking URI are
never logged or stored outside RUN_DIR/tracking/credentials.json (pipeline/secrets.py).
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

import yaml

from pipeline import tracking_ops as ops
from pipeline.config import RunConfig
from pipeline.run_dir import RunDir, atomic_write_json, atomic_write_text
from pipeline.secrets import real_uri, redact, shared_config
from pipeline.tracking_spool import Spool, first_line
from pipeline.tracking_tags import experiment_name, stage_tags

log = logging.getLogger("ftpipe.tracking")
FLUSH_TIMEOUT_S = 60.0  # at exit, a server that keeps answering gets this long for the queue
EXIT_STALL_S = 5.0  # at exit, a server that answers nothing for this long gets the rest spooled
RETRY_DELAYS_S = (0.5, 1.0, 2.0)
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # the tag mlflow.log_table sets
PROBE_INTERVAL_S = 30.0
# ftpipe retries itself; MLflow's defaults (7 retries, 120 s timeout) would hold a call for minutes.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow prints each ended run's URL, credentials included, on stdout.
QUIET_MLFLOW = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(obj)[:6000]}


class _Sender:
    """Sends records in order on a daemon thread: retries with backoff, then spools."""

    def __init__(self, uri: str, spool: Spool, ids: dict[str, str] | None = None):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        os.environ.update(QUIET_MLFLOW)
        self.uri, self.spool = uri, spool
        self.ids: dict[str, str] = ids or {}
        self.session: ops.Session | None = None
        self.queue: queue.Queue = queue.Queue()
        self.offline_until = 0.0
        self.closing = self.stopped = False
        self.handled, self.refused = 0, 0
        self.current: dict[str, Any] | None = None  # the record being sent
        self.lock = threading.Lock()  # a record is spooled once, by this thread or by close()
        self.thread = threading.Thread(target=self._loop, name="ftpipe-mlflow", daemon=True)
        self.thread.start()

    def submit(self, item: dict[str, Any] | Callable[[], Any]) -> None:
        self.queue.put(item)

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if callable(item):
                item()
                continue
            with self.lock:
                self.current = item
            self._deliver(item)
            with self.lock:
                self.current = None
            self.handled += 1

    def _deliver(self, op: dict[str, Any]) -> None:
        if self.stopped or time.monotonic() < self.offline_until:
            self._spool(op)
            return
        # A try after an outage, or at exit, gets no retries: the server is likely still down.
        delays = () if self.offline_until or self.closing else RETRY_DELAYS_S
        for delay in (*delays, None):
            try:
                self._session().send(op)
                self.offline_until = 0.0
                return
            except ops.Unresolved:  # its run's creation is in the spool already
                self._spool(op)
                return
            except Exception as err:  # noqa: BLE001 - tracking must never take training down
                if not ops.is_transient(err):
                    self.refused += 1
                    log.warning("MLflow refused a %s record (dropped): %s", op["op"], first_line(err))
                    return
                failure = err
            if delay is not None:
                time.sleep(delay)
        self._go_offline(failure)
        self._spool(op)

    def _session(self) -> ops.Session:
        if self.session is None:
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import
            self.session = ops.Session(self.uri, ids=self.ids)
        return self.session

    def _go_offline(self, err: BaseException) -> None:
        if not self.offline_until and not self.spool.records:
            log.warning("MLflow at %s is not answering (%s); tracking data goes to %s until it is back "
                        "(send it with `ftpipe sync`)", redact(self.uri), first_line(err), self.spool.folder)
        self.offline_until = time.monotonic() + PROBE_INTERVAL_S

    def _spool(self, op: dict[str, Any]) -> None:
        with self.lock:
            if op is not self.current:  # close() spooled it already
                return
            self.current = None
            self._write(op)

    def _write(self, op: dict[str, Any]) -> None:
        known = {"run_id": self.ids.get(op["key"]), "parent_id": self.ids.get(op.get("parent") or "")}
        self.spool.add({**op, **{k: v for k, v in known.items() if v}})

    def close(self, stall_s: float = EXIT_STALL_S) -> bool:
        """Send what is queued while the server keeps answering (none for `stall_s`: it is down, or
        hangs); spool the rest. True if all was sent."""
        self.closing = True
        self.queue.put(None)
        deadline, handled, progressed = time.monotonic() + FLUSH_TIMEOUT_S, -1, time.monotonic()
        while self.thread.is_alive() and time.monotonic() < deadline:
            # Importing MLflow (seconds on a busy node) is not the server's silence.
            if self.handled != handled or self.session is None:
                handled, progressed = self.handled, time.monotonic()
            if time.monotonic() - progressed > stall_s:
                break
            self.thread.join(0.1)
        if self.thread.is_alive():
            self._spool_queued()
        if self.spool.records:
            log.warning("%d tracking records were not sent; `ftpipe sync %s` sends them",
                        self.spool.records, self.spool.folder.parent.parent)
        return not self.spool.records and not self.refused

    def _spool_queued(self) -> None:
        # The call in flight may still get through: spooled too, `ftpipe sync` skips what arrived.
        with self.lock:
            self.stopped = True
            pending = [self.current] if self.current else []
            self.current = None
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                pending.append(item)
            elif item is not None:
                item()  # a waiter's event
        for op in pending:
            self._write(op)


class StageRun:
    """A nested MLflow run, named by its key from the start (its id comes when MLflow answers)."""

    def __init__(self, tracker: Tracker, name: str):
        self.tracker = tracker
        self.name = name
        self.key = ops.new_key()

    @property
    def run_id(self) -> str | None:
        return self.tracker.sender.ids.get(self.key)

    def reference(self, timeout: float = FLUSH_TIMEOUT_S) -> tuple[str, str | None]:
        """(key, run id) once the background thread has sent or spooled the run's creation."""
        handled = threading.Event()
        self.tracker.submit(handled.set)
        handled.wait(timeout)
        return self.key, self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tracker.submit(ops.batch(self.key, metrics, step))

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.submit(ops.batch(self.key, params=params))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.tracker.submit(ops.artifact(self.key, str(path), artifact_path))

    def log_table(self, path: Path) -> None:
        for op in table_ops(self.key, path):
            self.tracker.submit(op)

    def finish(self, status: str, manifest_path: Path | None = None) -> None:
        if manifest_path is not None and manifest_path.is_file():
            self.tracker.submit(ops.artifact(self.key, str(manifest_path), self.name))
        self.tracker.submit(ops.terminate(self.key, status))


class Tracker:
    """The MLflow side of one pipeline run."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_dir: RunDir,
                 artifact_root: Path | None = None):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_dir, self.artifact_root = run_dir, artifact_root
        self.parent_key = ops.new_key()
        self.sender = _Sender(uri, Spool(run_dir.spool_dir))

    @property
    def shown_uri(self) -> str:
        """The URI as it may be printed or stored: credentials redacted."""
        return redact(self.uri)

    @property
    def parent_id(self) -> str | None:
        return self.sender.ids.get(self.parent_key)

    def submit(self, item: dict[str, Any] | Callable[[], Any]) -> None:
        self.sender.submit(item)

    def start(self, config: dict[str, Any], tags: dict[str, str], attach_to: str | None = None) -> None:
        """Create the parent run, or with `attach_to` continue that one (a submitted run's jobs). MLflow
        gets the config without credentials or SLURM setup lines (pipeline/secrets.py)."""
        if attach_to:
            self.sender.ids[self.parent_key] = attach_to
            return
        shared = shared_config(config)
        self.run_dir.tracking_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config_file = self.run_dir.tracking_dir / "config.yaml"
        atomic_write_text(config_file, yaml.safe_dump(shared, sort_keys=False), private=True)
        location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
        self.submit(ops.create_run(self.parent_key, self.experiment, self.run_name, tags,
                                   artifact_location=location))
        self.submit(ops.batch(self.parent_key, params=flatten(shared)))
        self.submit(ops.artifact(self.parent_key, str(config_file)))

    def stage(self, name: str, params: dict[str, Any]) -> StageRun:
        stage = StageRun(self, name)
        location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
        self.submit(ops.create_run(stage.key, self.experiment, name, stage_tags(name),
                                   parent=self.parent_key, artifact_location=location))
        self.submit(ops.batch(stage.key, params=flatten(params)))
        return stage

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        self.submit(ops.batch(self.parent_key, metrics))

    def set_tag(self, key: str, value: str) -> None:
        self.submit(ops.batch(self.parent_key, tags={key: value}))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.submit(ops.artifact(self.parent_key, str(path), artifact_path))

    def close(self, status: str | None, stall_s: float = EXIT_STALL_S) -> bool:
        """Flush; end the parent run with `status` (None leaves it running for later jobs). True when
        everything reached MLflow."""
        if status is not None:
            self.submit(ops.terminate(self.parent_key, status))
        return self.sender.close(stall_s)


def create_parent_run(tracker: Tracker, config: dict[str, Any], tags: dict[str, str]) -> str | None:
    """Create the parent run now and leave it running; None (after one warning) if MLflow fails.
    `ftpipe submit` waits for a slow server here: without the parent, each job makes its own."""
    tracker.start(config, tags)
    tracker.close(None, stall_s=FLUSH_TIMEOUT_S)
    return tracker.parent_id


def write_parent(run_dir: RunDir, uri: str, run_id: str) -> None:
    atomic_write_json(run_dir.mlflow_parent_file, {"uri": redact(uri), "run_id": run_id})


def read_parent(run_dir: RunDir, uri: str) -> str | None:
    """The parent run recorded for this run directory on the same tracking store, if any."""
    try:
        found = json.loads(run_dir.mlflow_parent_file.read_text())
    except (OSError, ValueError):
        return None
    return found.get("run_id") if found.get("uri") == redact(uri) else None


def table_ops(key: str, path: Path) -> list[dict[str, Any]]:
    """A JSON table file (columns/data, as mlflow.log_table writes one) at the run's artifact root, and
    the tag by which the MLflow UI lists it among the run's tables."""
    tag = json.dumps([{"path": path.name, "type": "table"}])
    return [ops.artifact(key, str(path)), ops.batch(key, tags={LOGGED_ARTIFACTS_TAG: tag})]


class AttachedStageRun:
    """A stage run created by the pipeline process, logged to from another process (a torchrun
    rank): same background thread, same retries and spool."""

    def __init__(self, uri: str, run_dir: RunDir, key: str, run_id: str | None):
        self.key = key
        self.sender = _Sender(uri, Spool(run_dir.spool_dir), {key: run_id} if run_id else None)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.sender.submit(ops.batch(self.key, metrics, step))

    def log_params(self, params: dict[str, Any]) -> None:
        self.sender.submit(ops.batch(self.key, params=params))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.sender.submit(ops.artifact(self.key, str(path), artifact_path))

    def log_table(self, path: Path) -> None:
        for op in table_ops(self.key, path):
            self.sender.submit(op)

    def close(self) -> bool:
        return self.sender.close()


def tracking_uri(cfg: RunConfig, run_dir: RunDir, environ: dict[str, str] | None = None) -> str:
    """tracking.mlflow_uri (its credentials from the run directory), else MLFLOW_TRACKING_URI, else
    sqlite in the run directory's parent (output_dir)."""
    environ = os.environ if environ is None else environ
    if cfg.tracking.mlflow_uri:
        return real_uri(cfg.tracking.mlflow_uri, run_dir)
    return environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir.root.parent)


def build_tracker(cfg: RunConfig, environ: dict[str, str] | None = None) -> Tracker | None:
    """The run's tracker (tracking_uri); None when tracking is off."""
    if not cfg.tracking.enabled:
        return None
    run_dir = RunDir(cfg.run_dir.resolve())
    run_dir.root.parent.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg, run_dir, environ)
    artifacts = run_dir.root.parent / "mlartifacts" if uri.startswith("sqlite:") else None
    return Tracker(uri, experiment_name(cfg, environ), cfg.name, run_dir, artifacts)
