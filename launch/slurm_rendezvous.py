"""Where the ranks of a multi-node SLURM job meet: node rank from SLURM, rendezvous at the allocation's
first node (its NodeAddr, from the expanded nodelist), each node's own address for the others."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import UserError

RDZV_HOST_ENV = "FTPIPE_RDZV_HOST"
RDZV_BASE_PORT = 29400


def slurm_rendezvous(cfg: RunConfig, node: int) -> Any:
    """launch settings for this node: node rank from SLURM, endpoint = the allocation's first node,
    and this node's own address (its NodeAddr) for the other nodes to reach it at."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", cfg.launch.nnodes))
    if nodes != cfg.launch.nnodes:
        raise UserError(
            f"the job has {nodes} nodes but launch.nnodes is {cfg.launch.nnodes}; make them equal")
    if nodes == 1:
        return cfg.launch.model_copy(update={"node_rank": 0, "rdzv_endpoint": None})
    port = RDZV_BASE_PORT + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000
    endpoint = f"{rendezvous_host()}:{port}"
    here = os.environ.get("SLURMD_NODENAME")
    return cfg.launch.model_copy(update={"node_rank": node, "rdzv_endpoint": endpoint,
                                         "local_addr": node_address(here) if here else None})


def rendezvous_host() -> str:
    """Address of the first node of the allocation: from the expanded nodelist, never the raw one."""
    if os.environ.get(RDZV_HOST_ENV):
        return os.environ[RDZV_HOST_ENV]
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    return node_address(_scontrol(["show", "hostnames", nodelist]).split()[0])


def node_address(name: str) -> str:
    """How nodes reach node `name`: its NodeAddr when the cluster sets one, else the name."""
    for item in _scontrol(["show", "node", name]).split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1]
    return name


def _scontrol(args: list[str]) -> str:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if done.returncode != 0 and args[:2] == ["show", "hostnames"]:
        raise UserError(f"scontrol show hostnames {args[2]!r} failed: {done.stderr.strip()}")
    return done.stdout if done.returncode == 0 else ""
