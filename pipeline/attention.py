"""model.attn_implementation: which attention kernels a run may ask for, and what each needs.
Import-light (config validation imports it): torch is imported only to ask about CUDA."""

from __future__ import annotations

import importlib.util
import socket

from pipeline.errors import UserError

BUILT_IN = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# The package each flash kernel is imported from (flash-attn 2 and the FA3 "hopper" build).
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def is_flash(name: str) -> bool:
    """Flash kernels (built in or from the kernels hub) read packing from cu_seq_lens, not a mask."""
    return "flash" in name


def check_attn_implementation(name: str) -> str:
    """`name` if it is a known kernel whose package is installed; ValueError naming what is missing.
    Whether the kernel's device is there is asked apart (needs_cuda, check_attn_device): a SLURM
    login node has no GPU, so a job's device is checked in the job."""
    if name not in BUILT_IN and "/" not in name:
        raise ValueError(f"{name!r} is none of {', '.join(BUILT_IN)} or a kernels-hub name (org/repo)")
    package = FLASH_PACKAGES.get(name) or ("kernels" if "/" in name else None)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"{name} needs the python package {package!r}, which is not installed")
    return name


def needs_cuda(name: str) -> bool:
    """Flash kernels and kernels-hub ones run on CUDA only."""
    return is_flash(name) or "/" in name


def check_run_attention(name: str, device: str, backend: str) -> None:
    """Config validation's part: a flash kernel with train.device cpu is refused; CUDA itself is
    checked here except under SLURM, whose login node has no GPU (the job checks, train.stage)."""
    if not needs_cuda(name):
        return
    if device == "cpu":
        raise ValueError(f"model.attn_implementation: {name} needs CUDA but train.device is cpu")
    if backend != "slurm":
        check_attn_device(name)


def check_attn_device(name: str, device_type: str | None = None) -> None:
    """A UserError (a ValueError: config validation reports it too) when `name` needs CUDA and the
    device (default: this machine's best) is not CUDA."""
    if not needs_cuda(name):
        return
    if device_type is None:
        device_type = "cuda" if _has_cuda() else "cpu"
    if device_type != "cuda":
        where = "this machine has none" if device_type == "cpu" and not _has_cuda() else "train.device is cpu"
        raise UserError(f"model.attn_implementation: {name} needs a CUDA GPU and {where} "
                         f"(node {socket.gethostname()}); use sdpa or eager")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
