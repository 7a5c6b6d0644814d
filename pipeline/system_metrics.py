"""The train stage's system metrics under MLflow's own names (its System Metrics tab shows them): CPU and
memory from psutil, GPU utilisation and memory through nvidia-ml-py when it is installed. Sampled on a
daemon thread and logged through the stage's tracker, so a dead server costs training nothing here
either. MLflow's own monitor is not used: it logs around ftpipe's retries and spool."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import ModuleType, TracebackType

import psutil

INTERVAL_S = 10.0
MIB = 2**20


def host_sample() -> dict[str, float]:
    memory = psutil.virtual_memory()
    return {"system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
            "system/system_memory_usage_megabytes": (memory.total - memory.available) / MIB,
            "system/system_memory_usage_percentage": memory.percent}


def open_nvml() -> ModuleType | None:
    """NVML (the nvidia-ml-py package) initialised once for a monitor's life; None without it, a driver or
    GPUs. NVML counts its initialisations, so each `open_nvml` needs its `close_nvml`."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no package, no driver, no GPU: no GPU metrics
        return None
    return pynvml


def close_nvml(nvml: ModuleType | None) -> None:
    if nvml is not None:
        with contextlib.suppress(Exception):  # a driver gone at the end must not fail a finished run
            nvml.nvmlShutdown()


def gpu_sample(nvml: ModuleType | None) -> dict[str, float]:
    """Per visible GPU, through an NVML from `open_nvml`; nothing without one."""
    sample = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount() if nvml is not None else 0):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            sample[f"system/gpu_{index}_utilization_percentage"] = float(busy)
            sample[f"system/gpu_{index}_memory_usage_megabytes"] = memory.used / MIB
            sample[f"system/gpu_{index}_memory_usage_percentage"] = 100.0 * memory.used / max(1, memory.total)
    except Exception:  # noqa: BLE001 - a GPU lost mid-run: this sample has none, training goes on
        return {}
    return sample


class SystemMetrics:
    """`with SystemMetrics(log):` samples at entry, every `interval` seconds, and at exit."""

    def __init__(self, log: Callable[[dict[str, float], int | None], None], interval: float = INTERVAL_S,
                 enabled: bool = True):
        self.log, self.interval, self.enabled = log, interval, enabled
        self.samples = 0
        self.nvml: ModuleType | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ftpipe-system-metrics", daemon=True)

    def __enter__(self) -> SystemMetrics:
        if self.enabled:
            psutil.cpu_percent(interval=None)  # the first call only starts psutil's CPU interval
            self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.enabled:
            self.stopped.set()
            self.thread.join(timeout=5)  # a hung NVML call must not hold up the end of training

    def _loop(self) -> None:
        """The one thread that opens NVML, samples (the last sample at exit) and closes it."""
        self.nvml = open_nvml()
        try:
            self.record()
            while not self.stopped.wait(self.interval):
                self.record()
            self.record()
        finally:
            close_nvml(self.nvml)

    def record(self) -> None:
        self.log({**host_sample(), **gpu_sample(self.nvml)}, self.samples)
        self.samples += 1
