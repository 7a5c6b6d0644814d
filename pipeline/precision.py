"""The precision a run trains in: bf16 only where the hardware computes it natively.

A CPU without bf16 instructions (no avx512_bf16, no AMX, no ARM bf16) emulates bf16 matmuls element by
element: measured on an AVX2 EPYC, 0.8 GFLOP/s against ~100 in fp32, a train step 20x slower and with
more memory. So `train.precision: bf16` there trains in fp32, with one warning line giving the cost
measured on this machine, unless `train.allow_slow_bf16: true` asks for bf16 anyway.
"""

from __future__ import annotations

import logging
import platform
import socket
import time
from pathlib import Path

import torch

from pipeline.config import RunConfig, TrainConfig
from pipeline.run_dir import RunDir

log = logging.getLogger("ftpipe")
# CPU feature flags (/proc/cpuinfo names) of native bf16 arithmetic: x86 AVX512-BF16 and AMX, ARM BF16.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
PROBE_SIZE = 192  # a matmul small enough to time in milliseconds even when bf16 is emulated


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of this machine's CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if platform.system() == "Darwin":
        return platform.machine() == "arm64"  # Apple silicon has bf16 since M2; no /proc/cpuinfo there
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def bf16_slowdown(size: int = PROBE_SIZE) -> float:
    """How many times longer a bf16 matmul takes than an fp32 one on this CPU (best of three each)."""
    a = torch.randn(size, size)
    return _best_time(a.bfloat16()) / _best_time(a)


def _best_time(a: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def trained_precision(train: TrainConfig, device: torch.device) -> tuple[str, str | None]:
    """(the precision to train in, the warning to give): fp32 for bf16 on a CPU without native bf16
    unless train.allow_slow_bf16."""
    if train.precision != "bf16" or train.allow_slow_bf16 or native_bf16(device):
        return train.precision, None
    return "fp32", (f"train.precision bf16: this CPU ({socket.gethostname()}) has no native bf16 "
                    f"(no avx512_bf16/amx/bf16 flag); a bf16 matmul ran {bf16_slowdown():.0f}x slower than "
                    "fp32 here, so training runs in fp32 (train.allow_slow_bf16: true trains in bf16 anyway)")


def precision_warning(train: TrainConfig) -> str | None:
    """What `validate` and `run` say before training on this machine's CPU in bf16."""
    if torch.cuda.is_available():
        return None
    return trained_precision(train, torch.device("cpu"))[1]


def as_trained(cfg: RunConfig, run_dir: RunDir) -> RunConfig:
    """`cfg` with the precision training actually ran in (the train manifest's), for what reproduces or
    follows training: consolidate's check and dtype, evaluate, export."""
    trained = (run_dir.read_manifest("train") or {}).get("precision", cfg.train.precision)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": trained})})
