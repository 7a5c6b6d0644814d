"""The one module that owns torch.distributed: process-group set-up from the torchrun
environment (or a 1-rank group in this process), rank and world size, barriers, reductions,
and the seeding every process does alike.

Everything else asks this module; engines may wrap models with DDP / FSDP / DeepSpeed, but
nothing else initialises, queries or tears down the process group.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import resource
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError

TIMEOUT = datetime.timedelta(minutes=30)
# Fewer fragmentation OOMs for training's changing tensor sizes; a user's own setting wins.
ALLOC_CONF_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
ALLOC_CONF_DEFAULT = "expandable_segments:True"
log = logging.getLogger("ftpipe")
_device_type: str | None = None  # what init chose (train.device); None: cuda when present


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False
    device_type: str | None = None  # "cuda" or "cpu"; None: cuda when present

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if (self.device_type or _best_device()) == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def _best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_device(choice: str, warn_cpu_fallback: bool = False,
                  environ: Mapping[str, str] | None = None) -> str:
    """train.device resolved on this node: "cuda" or "cpu". `cuda` without a GPU is a UserError;
    `auto` falling back to the CPU where a node runs several ranks, or in a SLURM job, says so once
    per node (local rank 0) when `warn_cpu_fallback`."""
    environ = os.environ if environ is None else environ
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise UserError(f"train.device: cuda, but node {socket.gethostname()} has no CUDA GPU "
                        f"(torch.cuda.is_available() is false); set train.device: auto or cpu")
    per_node = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    several = per_node > 1 or "SLURM_JOB_ID" in environ
    if warn_cpu_fallback and several and environ.get("LOCAL_RANK", "0") == "0":
        log.warning("WARNING: no CUDA GPU on node %s: training on the CPU with %d rank(s) here "
                    "(train.device: auto); set train.device: cuda to make this an error, or cpu to "
                    "silence it", socket.gethostname(), per_node)
    return "cpu"


def default_alloc_conf(environ: dict[str, str] | os._Environ) -> None:
    """expandable_segments for the CUDA caching allocator, unless the user configured it; read when
    CUDA first allocates, so set before that (here, and in the environment of torchrun's ranks)."""
    if not any(environ.get(key) for key in ALLOC_CONF_ENV):
        environ[ALLOC_CONF_ENV[0]] = ALLOC_CONF_DEFAULT


def seed_everything(seed: int) -> None:
    """Every process seeds alike: ranks then build identical models before any broadcast."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return all(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def backend_name() -> str:
    """nccl for the device init chose (train.device), gloo for the CPU even where CUDA exists."""
    return "nccl" if (_device_type or _best_device()) == "cuda" else "gloo"


def prepare_accelerator_env() -> None:
    """DeepSpeed picks its accelerator at import; on the CPU it must be told so."""
    if (_device_type or _best_device()) == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def rank_threads(environ: Mapping[str, str], cores: int | None = None) -> int:
    """Intra-op threads for this rank: the cores it may run on, shared by the ranks of its node. Set
    here, once per rank as it joins: torchrun sets OMP_NUM_THREADS=1 for every rank of a multi-rank
    node, which leaves all but one core per rank idle on a CPU node, and one rank per node alone
    should not oversubscribe the cores a scheduler (SLURM, taskset) gave it."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, cores // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1"))))


_SOLO_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_saved_env: dict[str, str | None] | None = None


def init(need_group: bool, device: str = "auto", warn_cpu_fallback: bool = False) -> DistEnv:
    """Join the torchrun group if launched by torchrun; else, if need_group, make a 1-rank group.
    `device` is train.device (see choose_device); it picks the backend too."""
    global _device_type
    if dist.is_initialized():
        return current()
    torch.set_num_threads(rank_threads(os.environ))
    _device_type = choose_device(device, warn_cpu_fallback)
    prepare_accelerator_env()
    if launched_by_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        if _device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend_name(), timeout=TIMEOUT)
    elif need_group:
        _init_solo()
    return current()


def _init_solo() -> None:
    """A 1-rank group in this process: an in-memory store (no port to race for), and the rank
    variables DeepSpeed reads, set only while the group lives so later runs in this process do not
    mistake themselves for torchrun ranks."""
    global _saved_env
    _saved_env = {key: os.environ.get(key) for key in _SOLO_ENV}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend_name(), store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT)


def current() -> DistEnv:
    if not dist.is_initialized():
        return DistEnv(device_type=_device_type)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True,
                   _device_type)


def shutdown() -> None:
    """Leave the group together: a rank tearing down while another still talks aborts it."""
    global _saved_env, _device_type
    _device_type = None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for key, value in (_saved_env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float) -> float:
    """Sum a Python number over ranks (float64, so token counts stay exact)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_reduce_max(value: int) -> int:
    """The largest of the ranks' integers: how ranks agree on whether (and why) to act together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(value)
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sum_array(values: np.ndarray) -> np.ndarray:
    """The element-wise sum over ranks of a float64 or int64 array (int64: counts stay exact)."""
    assert values.dtype in (np.float64, np.int64), f"exact sums need float64 or int64, not {values.dtype}"
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(values)).to(_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(work: Callable[[], Any], timeout: datetime.timedelta) -> Any:
    """`work()`, run by rank 0 alone while the other ranks wait for it up to `timeout` (in a gloo group
    of their own: the main group's TIMEOUT is too short for a long evaluation); every rank gets its
    result, or leaves with its error."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    group = dist.new_group(backend="gloo", timeout=timeout)
    box: list[Any] = [None]
    try:
        if dist.get_rank() == 0:
            try:
                box = [(work(), None)]
            except BaseException as err:  # a stop signal too: nobody is left waiting for two days
                dist.broadcast_object_list([(None, str(err) or type(err).__name__)], src=0, group=group)
                raise
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    result, error = box[0]
    if error is not None:
        raise UserError(f"rank 0 failed: {error}")
    return result


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """This process's peaks: CUDA allocated and reserved bytes (None off CUDA) and host RSS."""
    on_cuda = device.type == "cuda"
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if on_cuda else None,
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device) if on_cuda else None,
            # ru_maxrss is in KiB on Linux
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

