"""What every ftpipe run carries in MLflow besides its params: the experiment it goes to, its tags, and
the MLFLOW_* variables users already set for the Hugging Face Trainer (MLFLOW_EXPERIMENT_NAME,
MLFLOW_RUN_ID, MLFLOW_TAGS), honoured the same way here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pipeline
from pipeline.config import RunConfig
from pipeline.errors import UserError

# One experiment for all runs unless told otherwise: runs are compared within an experiment.
DEFAULT_EXPERIMENT = "ftpipe"


def experiment_name(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return cfg.tracking.experiment or environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def user_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLFLOW_TAGS, a JSON object of tags (as the HF Trainer reads it)."""
    environ = os.environ if environ is None else environ
    text = environ.get("MLFLOW_TAGS")
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError:
        tags = None
    if not isinstance(tags, dict):
        raise UserError("MLFLOW_TAGS: expected a JSON object of tags, e.g. '{\"team\": \"nlp\"}'")
    return {str(k): str(v) for k, v in tags.items()}


def outer_run(environ: Mapping[str, str] | None = None) -> str | None:
    """MLFLOW_RUN_ID: an existing run that ftpipe's parent run goes under (a notebook's or a
    workflow's run)."""
    environ = os.environ if environ is None else environ
    return environ.get("MLFLOW_RUN_ID") or None


def git_commit(folder: Path) -> tuple[str, bool] | None:
    """(HEAD commit, whether the work tree has changes) of the git repository holding `folder`."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip(), bool(dirty.stdout.strip())


def run_tags(cfg: RunConfig, run_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent run's tags: where it ran, what code, what layout; the user's MLFLOW_TAGS last."""
    environ = os.environ if environ is None else environ
    launch = cfg.launch
    tags = {"ftpipe.run_dir": str(run_dir), "ftpipe.version": pipeline.__version__,
            "ftpipe.strategy": cfg.train.strategy,
            "ftpipe.world_size": str(launch.nnodes * launch.nproc_per_node), "ftpipe.backend": launch.backend}
    commit = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["ftpipe.git_dirty"] = str(commit[1]).lower()
    return {**tags, **stage_tags(None, environ), **user_tags(environ)}


def stage_tags(stage: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A stage run's tags (None: the parent run's): the stage, the host, its SLURM job and nodes."""
    environ = os.environ if environ is None else environ
    tags = {"ftpipe.stage": stage, "ftpipe.host": socket.gethostname(),
            "ftpipe.slurm_job_id": environ.get("SLURM_JOB_ID"),
            "ftpipe.slurm_nodes": environ.get("SLURM_JOB_NODELIST")}
    return {k: v for k, v in tags.items() if v}
