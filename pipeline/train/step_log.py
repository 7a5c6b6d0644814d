"""One timestamped line per logged step for logs nobody watches live (SLURM, nohup, CI): where training
is, how fast, how well the hardware is used and when it will end. Written through Python logging
(logger `ftpipe.train`), so users can route it; the command line prints it when no progress bar shows.

MFU is 6 N tokens/s over the matmul peak of this device in the training precision, measured once at
the start (attention's FLOPs left out: an estimate, as in nanoGPT and torchtitan's logs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline import distributed
from pipeline.context import clock, stamp

# Probe sizes: big enough to reach a GPU's peak; on a CPU (which may emulate bf16) small enough to be quick.
GPU_PROBE, CPU_PROBE = 8192, 768


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of three square matmuls on `device` in `dtype`."""
    size = GPU_PROBE if device.type == "cuda" else CPU_PROBE
    a = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        _synchronize(device)
        started = time.perf_counter()
        a @ a
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / max(best, 1e-9)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    """Bytes: the CUDA allocator's high-water mark, else this process's peak RSS."""
    peaks = distributed.peak_memory(device)
    return peaks["cuda_max_allocated_bytes"] or peaks["peak_rss_bytes"]


def _size(value: float) -> str:
    return f"{value / 2**30:.2f}G" if value >= 2**30 else f"{value / 2**20:.0f}M"


@dataclass
class StepLog:
    rows: int  # training rows: an epoch's samples
    parameters: int
    peak_flops: float
    device: torch.device
    started: float = field(default_factory=time.monotonic)
    first_step: int | None = None  # the step this process started at (a resumed run's is not 0)

    def line(self, step: int, total: int, samples: int, metrics: dict[str, float]) -> str:
        if self.first_step is None:
            self.first_step = step - 1
        elapsed = time.monotonic() - self.started
        per_step = elapsed / max(1, step - self.first_step)
        tokens_per_second = metrics["tokens_per_second"]
        mfu = 6 * self.parameters * tokens_per_second / max(self.peak_flops, 1.0)
        return (f"{stamp()} train step {step}/{total} epoch {samples / max(1, self.rows):.2f} "
                f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} grad_norm {metrics['grad_norm']:.3f} "
                f"tokens/s {tokens_per_second:.0f} mfu {100 * mfu:.1f}% "
                f"peak_mem {_size(peak_memory(self.device))} "
                f"elapsed {clock(elapsed)} eta {clock(per_step * (total - step))}")
