"""Tracking calls as plain JSON records ("ops"), and how one is sent with MLflow's client.

The live tracker and `ftpipe sync` send the same records: what could not be sent during a run is
spooled as is (pipeline/tracking_spool.py) and sent later. Runs are named by a key of ours, known
before MLflow answers; every run carries it as the tag `ftpipe.key`, so a run is created once
however often its record is sent. Metrics keep the time they were measured at: sending one twice
is recognised (MLflow's SQL store drops the exact duplicate; `ftpipe sync` checks the history).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

KEY_TAG = "ftpipe.key"
PARENT_TAG = "mlflow.parentRunId"
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-call maxima


class Unresolved(LookupError):
    """The op's run was not created on the server (its creation is in the spool)."""


def new_key() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


def create_run(key: str, experiment: str, run_name: str, tags: dict[str, str], parent: str | None = None,
               artifact_location: str | None = None) -> dict[str, Any]:
    return {"op": "create_run", "key": key, "experiment": experiment, "run_name": run_name, "tags": tags,
            "parent": parent, "artifact_location": artifact_location}


def batch(key: str, metrics: dict[str, float] | None = None, step: int | None = None,
          params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    stamp = now_ms()
    return {"op": "batch", "key": key,
            "metrics": [[k, float(v), stamp, step or 0] for k, v in (metrics or {}).items()],
            "params": [[k, str(v)[:6000]] for k, v in (params or {}).items()],
            "tags": [[k, str(v)] for k, v in (tags or {}).items()]}


def artifact(key: str, path: str, artifact_path: str | None = None) -> dict[str, Any]:
    return {"op": "artifact", "key": key, "path": path, "artifact_path": artifact_path}


def terminate(key: str, status: str) -> dict[str, Any]:
    return {"op": "terminate", "key": key, "status": status, "end_time": now_ms()}


def is_transient(err: BaseException) -> bool:
    """Worth retrying (server down, overloaded, network) rather than refused for good."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in TRANSIENT_CODES
    return isinstance(err, OSError)  # requests' and urllib3's errors are OSErrors


class Session:
    """An MLflow client and what this process knows of it: run key -> run id, experiment ids.

    `replaying` (ftpipe sync) looks runs up by their key tag and skips metric values the server has.
    """

    def __init__(self, uri: str, replaying: bool = False, ids: dict[str, str] | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.replaying = replaying
        self.ids: dict[str, str] = {} if ids is None else ids
        self.creations: dict[str, dict[str, Any]] = {}  # replaying: creations not yet sent
        self.experiments: dict[str, str] = {}
        self.history: dict[tuple[str, str], set[tuple[int, int]]] = {}

    def run_id(self, op: dict[str, Any]) -> str:
        if op.get("run_id"):
            return op["run_id"]
        key = op["key"]
        if key not in self.ids and key in self.creations:
            self.send(self.creations[key])
        if key not in self.ids:
            raise Unresolved(key)
        return self.ids[key]

    def send(self, op: dict[str, Any]) -> None:
        getattr(self, f"_{op['op']}")(op)

    def _create_run(self, op: dict[str, Any]) -> None:
        if op["key"] in self.ids:
            return
        experiment_id = self.experiment_id(op["experiment"], op.get("artifact_location"))
        tags = {**op["tags"], KEY_TAG: op["key"]}
        if op.get("parent"):
            tags[PARENT_TAG] = self.run_id({"key": op["parent"], "run_id": op.get("parent_id")})
        found = self._existing(experiment_id, op["key"]) if self.replaying else None
        self.ids[op["key"]] = found or self.client.create_run(
            experiment_id, run_name=op["run_name"], tags=tags).info.run_id

    def _existing(self, experiment_id: str, key: str) -> str | None:
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'")
        return runs[0].info.run_id if runs else None

    def experiment_id(self, name: str, location: str | None) -> str:
        if name not in self.experiments:
            found = self.client.get_experiment_by_name(name)
            self.experiments[name] = found.experiment_id if found else self._create_experiment(name, location)
        return self.experiments[name]

    def _create_experiment(self, name: str, location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id  # another job created it just now

    def _batch(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = self.run_id(op)
        metrics = [m for m in op["metrics"] if not self._sent_before(run_id, m)]
        entities = {"metrics": [Metric(k, v, ts, step) for k, v, ts, step in metrics],
                    "params": [Param(k, v) for k, v in op["params"]],
                    "tags": [RunTag(k, v) for k, v in op["tags"]]}
        for kind, items in entities.items():
            size = BATCH_LIMITS[kind]
            for start in range(0, len(items), size):
                self.client.log_batch(run_id, **{kind: items[start:start + size]})
        for metric in metrics:
            self._sent_before(run_id, metric, record=True)

    def _sent_before(self, run_id: str, metric: list, record: bool = False) -> bool:
        if not self.replaying:
            return False
        name, _, stamp, step = metric
        if (run_id, name) not in self.history:
            logged = self.client.get_metric_history(run_id, name)
            self.history[run_id, name] = {(m.step, m.timestamp) for m in logged}
        seen = self.history[run_id, name]
        if record:
            seen.add((step, stamp))
        return (step, stamp) in seen

    def _artifact(self, op: dict[str, Any]) -> None:
        self.client.log_artifact(self.run_id(op), op["path"], artifact_path=op.get("artifact_path"))

    def _terminate(self, op: dict[str, Any]) -> None:
        self.client.set_terminated(self.run_id(op), status=op["status"], end_time=op["end_time"])
