"""model.attn_implementation: which attention kernels a run may ask for, and what each needs.
Import-light (config validation imports it): torch is imported only to ask about CUDA."""

from __future__ import annotations

import importlib.util

BUILT_IN = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# The package each flash kernel is imported from (flash-attn 2 and the FA3 "hopper" build).
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def is_flash(name: str) -> bool:
    """Flash kernels (built in or from the kernels hub) read packing from cu_seq_lens, not a mask."""
    return "flash" in name


def check_attn_implementation(name: str) -> str:
    """`name` if this machine can run it; ValueError naming what is missing otherwise."""
    if name not in BUILT_IN and "/" not in name:
        raise ValueError(f"{name!r} is none of {', '.join(BUILT_IN)} or a kernels-hub name (org/repo)")
    package = FLASH_PACKAGES.get(name) or ("kernels" if "/" in name else None)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"{name} needs the python package {package!r}, which is not installed")
    if (package or is_flash(name)) and not _has_cuda():
        raise ValueError(f"{name} needs a CUDA GPU and this machine has none; use sdpa or eager")
    return name


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
