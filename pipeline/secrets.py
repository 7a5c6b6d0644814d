"""Keeping credentials out of what ftpipe logs and stores.

A password in a URI's userinfo (`http://user:pass@host`) is replaced by `***` in every message,
MLflow param, artifact and file of the run directory; the one copy a later process needs (a SLURM
job, `ftpipe sync`) lives in RUN_DIR/tracking/credentials.json, readable by its owner only.
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD keep credentials out of every file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from pipeline.errors import UserError
from pipeline.run_dir import RunDir, atomic_write_json

REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_ASSIGNED = re.compile(r"(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)
PRIVATE_UMASK = 0o077
log = logging.getLogger("ftpipe")


def redact(text: str) -> str:
    """`text` with the userinfo of every URI in it replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def has_credentials(uri: str | None) -> bool:
    """True when `uri` carries real userinfo (not the *** it is stored with)."""
    found = _USERINFO.search(uri or "")
    return found is not None and found["userinfo"] != REDACTED


def is_redacted(uri: str | None) -> bool:
    found = _USERINFO.search(uri or "")
    return found is not None and found["userinfo"] == REDACTED


def stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """The config as the run directory keeps it (config.yaml): the tracking URI redacted."""
    tracking = dict(data.get("tracking") or {})
    if tracking.get("mlflow_uri"):
        tracking["mlflow_uri"] = redact(tracking["mlflow_uri"])
    return {**data, "tracking": tracking}


def shared_config(data: dict[str, Any]) -> dict[str, Any]:
    """The config as MLflow gets it (params, the config.yaml artifact): also without the SLURM setup
    lines, which may export tokens."""
    out = stored_config(data)
    launch = dict(out.get("launch") or {})
    slurm = dict(launch.get("slurm") or {})
    if slurm.get("setup"):
        slurm["setup"] = f"({len(slurm['setup'])} lines, not recorded)"
    return {**out, "launch": {**launch, "slurm": slurm}} if launch else out


def write_credentials(run_dir: RunDir, uri: str) -> None:
    """Keep the real tracking URI for the run's later processes (0600 file in a 0700 folder)."""
    run_dir.tracking_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_json(run_dir.credentials_file, {"mlflow_uri": uri}, private=True)
    log.warning("tracking.mlflow_uri holds credentials: ftpipe keeps them only in %s (owner-only) and "
                "redacts them everywhere else; MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD keep "
                "them out of files altogether", run_dir.credentials_file)


def real_uri(uri: str, run_dir: RunDir) -> str:
    """The tracking URI to connect with: a redacted one (from config.yaml) gets its credentials back."""
    if not is_redacted(uri):
        return uri
    try:
        kept = json.loads(run_dir.credentials_file.read_text())["mlflow_uri"]
    except (OSError, ValueError, KeyError):
        kept = None
    if kept is None or redact(kept) != uri:
        raise UserError(f"tracking.mlflow_uri {uri!r}: its credentials were redacted and "
                        f"{run_dir.credentials_file} does not hold them; give the URI without userinfo and "
                        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return kept


def secret_setup_names(setup: list[str]) -> list[str]:
    """Variables that `setup` lines assign whose names look like credentials (HF_TOKEN, ..._KEY)."""
    names = (name for line in setup for name in _ASSIGNED.findall(line))
    return sorted({name for name in names if _SECRET_NAME.search(name)})


def warn_secret_setup(setup: list[str]) -> None:
    names = secret_setup_names(setup)
    if names:
        log.warning("launch.slurm.setup sets %s: the value is written into every batch script (kept "
                    "owner-only, never sent to MLflow); exporting it in the shell you submit from keeps it "
                    "out of files (sbatch passes the environment on)", ", ".join(names))


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Files and folders created inside (and by child processes such as sbatch) are owner-only."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)

