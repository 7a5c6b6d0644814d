"""Start the distributed stages (train, evaluate) under torchrun; every other stage runs in the
pipeline's process.

`python -m launch.torchrun ARGS` is torchrun itself, made deaf to the stop signals (SIGUSR1/2,
SIGTERM) that its workers act on: by default those signals would end torchrun, and on SIGTERM it
would kill the workers before they could save.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from launch.worker import ERROR_FILE, RESULT_FILE, RUN_ID_ENV, RUN_KEY_ENV, STOPPED_FILE, URI_ENV
from pipeline.config import RunConfig
from pipeline.config_launch import LaunchConfig
from pipeline.context import StageContext
from pipeline.errors import StagePreempted, UserError
from pipeline.preemption import StopRequest, ignore_stop_signals
from pipeline.stages import Stage

FORWARD_AGAIN_SECONDS = 5.0  # ranks still starting up have no handler yet and ignore the signal
log = logging.getLogger("ftpipe")


def torchrun_command(launch: LaunchConfig, run_name: str, worker_args: list[str]) -> list[str]:
    """torchrun arguments: standalone on one node, c10d rendezvous at rdzv_endpoint across nodes."""
    cmd = [sys.executable, "-m", "launch.torchrun", f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        # One node restarts by relaunching torchrun (launch_stage): ranks that torchrun restarted in
        # place, on its old store, have hung for good in gloo's connect on a loaded machine.
        cmd += ["--max-restarts=0", "--standalone"]
    else:
        # Node 0 hosts the rendezvous store; said outright, since torchrun's guess (does the endpoint
        # resolve to this host's name?) fails where NodeAddr is not the hostname's address.
        cmd += [f"--max-restarts={launch.max_restarts}", f"--nnodes={launch.nnodes}",
                f"--node-rank={launch.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={launch.rdzv_endpoint}", f"--rdzv-id={run_name}",
                f"--rdzv-conf=is_host={'true' if launch.node_rank == 0 else 'false'}"]
        if launch.local_addr:
            cmd.append(f"--local-addr={launch.local_addr}")
    return cmd + ["-m", "launch.worker", *worker_args]


def launch_stage(spec: Stage, cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Run `spec` here, or a distributed stage under torchrun, and return its result."""
    # backend slurm trains under torchrun too (one per node; `ftpipe run` starts it on this machine).
    if cfg.launch.backend == "local" or not spec.distributed:
        return spec.run(cfg, ctx)
    folder = ctx.run_dir.stage(spec.name)
    for stale in (RESULT_FILE, ERROR_FILE, STOPPED_FILE):
        (folder / stale).unlink(missing_ok=True)
    args = [str(ctx.run_dir.root), spec.name] + ([] if ctx.progress else ["--no-progress"])
    check_gpu_ranks(cfg.launch)
    env = _worker_env(ctx)
    for relaunch in range(cfg.launch.max_restarts + 1):
        code, signum = run_torchrun(torchrun_command(cfg.launch, cfg.name, args), env)
        if code == 0 or signum or (folder / ERROR_FILE).is_file() or cfg.launch.nnodes > 1 \
                or relaunch == cfg.launch.max_restarts:
            break
        # A fresh torchrun (new store, new ports) resumes from the latest complete checkpoint.
        log.warning("%s: torchrun exited with code %d; relaunching (%d of %d)", spec.name, code,
                    relaunch + 1, cfg.launch.max_restarts)
    return _result(folder, spec.name, code, signum)


def run_torchrun(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, int | None]:
    """Run torchrun; pass stop signals this process gets on to its ranks. (exit code, the stop signal
    this process got or None)"""
    with StopRequest().listening() as stop, subprocess.Popen(cmd, env=env) as proc:
        forwarded = -FORWARD_AGAIN_SECONDS
        try:
            while True:
                try:
                    return proc.wait(timeout=0.5), stop.signum
                except subprocess.TimeoutExpired:
                    pass
                if stop.requested and time.monotonic() - forwarded >= FORWARD_AGAIN_SECONDS:
                    forwarded = time.monotonic()
                    _signal_descendants(proc.pid, stop.signum)
        except BaseException:
            proc.send_signal(signal.SIGINT)  # torchrun ignores SIGTERM; on SIGINT it stops its ranks
            proc.wait(timeout=60)
            raise


def _signal_descendants(pid: int, signum: int) -> None:
    # torchrun starts each rank in a session of its own, so a process-group signal would miss them.
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def check_gpu_ranks(launch: LaunchConfig) -> None:
    """nproc_per_node 'gpu' counts this node's GPUs: none is a one-line error, not torchrun's traceback."""
    if launch.nproc_per_node != "gpu":
        return
    import torch

    if torch.cuda.device_count() == 0:
        raise UserError(f"launch.nproc_per_node: 'gpu' (one rank per GPU), but node {socket.gethostname()} "
                        "has no visible CUDA GPU")


def _worker_env(ctx: StageContext) -> dict[str, str]:
    """The ranks' environment; with tracking, the stage run to log to (the URI with its credentials
    travels in the environment only, never on a command line or in a file). CUDA's allocator gets
    expandable segments unless the user configured it."""
    from pipeline.distributed import default_alloc_conf

    env = dict(os.environ)
    default_alloc_conf(env)
    reference = getattr(ctx.tracker, "reference", None)
    if reference is not None:
        key, run_id = reference()
        env.update({RUN_KEY_ENV: key, URI_ENV: ctx.tracker.tracker.uri})
        if run_id:
            env[RUN_ID_ENV] = run_id
    return env


def _result(folder: Path, stage: str, code: int, signum: int | None = None) -> dict[str, Any]:
    error, stopped = folder / ERROR_FILE, folder / STOPPED_FILE
    if error.is_file():
        raise UserError(error.read_text().strip())
    if stopped.is_file():
        raise StagePreempted(stopped.read_text().strip(), signum)
    if code != 0:
        raise RuntimeError(f"{stage}: torchrun exited with code {code}; the ranks' errors are printed above")
    return json.loads((folder / RESULT_FILE).read_text())


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import main as torchrun_main

    ignore_stop_signals()
    torchrun_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
