"""Start the train stage under torchrun; every other stage runs in the pipeline's process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from launch.worker import ERROR_FILE, RESULT_FILE, RUN_ID_ENV, URI_ENV
from pipeline.config import LaunchConfig, RunConfig
from pipeline.context import StageContext
from pipeline.errors import UserError

DISTRIBUTED_STAGES = ("train",)
log = logging.getLogger("ftpipe")


def torchrun_command(launch: LaunchConfig, run_name: str, worker_args: list[str]) -> list[str]:
    """torchrun arguments: standalone on one node, c10d rendezvous at rdzv_endpoint across nodes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}",
           f"--max-restarts={launch.max_restarts}"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--rdzv-id={run_name}"]
    return cmd + ["-m", "launch.worker", *worker_args]


def launch_stage(spec: Any, cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Run `spec` here, or for the train stage under torchrun, and return its result."""
    # backend slurm trains under torchrun too (one per node; `ftpipe run` starts it on this machine).
    if cfg.launch.backend == "local" or spec.name not in DISTRIBUTED_STAGES:
        return spec.run(cfg, ctx)
    folder = ctx.run_dir.stage(spec.name)
    for stale in (RESULT_FILE, ERROR_FILE):
        (folder / stale).unlink(missing_ok=True)
    args = [str(ctx.run_dir.root), spec.name] + ([] if ctx.progress else ["--no-progress"])
    env = _worker_env(ctx)
    for relaunch in range(cfg.launch.max_restarts + 1):
        code = subprocess.call(torchrun_command(cfg.launch, cfg.name, args), env=env)
        if code == 0 or (folder / ERROR_FILE).is_file() or cfg.launch.nnodes > 1 \
                or relaunch == cfg.launch.max_restarts:
            break
        # torchrun's in-place restarts reuse its agent and rendezvous; on a loaded machine gloo
        # has failed to reconnect through them. A fresh torchrun resumes from the same checkpoint.
        log.warning("%s: torchrun exited with code %d; relaunching (%d of %d)", spec.name, code,
                    relaunch + 1, cfg.launch.max_restarts)
    return _result(folder, spec.name, code)


def _worker_env(ctx: StageContext) -> dict[str, str]:
    env = dict(os.environ)
    run_id = getattr(ctx.tracker, "wait_for_id", lambda: None)()
    if run_id:
        env[RUN_ID_ENV] = run_id
        env[URI_ENV] = ctx.tracker.tracker.uri
    return env


def _result(folder, stage: str, code: int) -> dict[str, Any]:
    error = folder / ERROR_FILE
    if error.is_file():
        raise UserError(error.read_text().strip())
    if code != 0:
        raise RuntimeError(f"{stage}: torchrun exited with code {code}; the ranks' errors are printed above")
    return json.loads((folder / RESULT_FILE).read_text())
