"""The train stage's system-metrics monitor: host samples from psutil, GPU samples through NVML opened
once for the monitor's life."""

import sys
import threading
from types import ModuleType, SimpleNamespace

from pipeline.system_metrics import SystemMetrics


def fake_nvml(calls: list[str]) -> ModuleType:
    """nvidia-ml-py's calls that the monitor makes, for one GPU. A fake because NVML needs an NVIDIA driver
    and GPU, which these machines lack; it records when NVML is opened and closed."""
    nvml = ModuleType("pynvml")
    nvml.nvmlInit = lambda: calls.append("init")
    nvml.nvmlShutdown = lambda: calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(used=2**30, total=4 * 2**30)
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: SimpleNamespace(gpu=75)
    return nvml


def test_nvml_is_opened_once_for_all_samples_and_closed_at_exit(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(calls))
    samples, three = [], threading.Event()

    def log(metrics: dict[str, float], step: int | None) -> None:
        samples.append((step, metrics))
        if len(samples) >= 3:
            three.set()

    with SystemMetrics(log, interval=0.01):
        assert three.wait(10)
    assert calls == ["init", "shutdown"]
    assert [step for step, _ in samples] == list(range(len(samples)))
    for _, metrics in samples:
        assert metrics["system/gpu_0_utilization_percentage"] == 75.0
        assert metrics["system/gpu_0_memory_usage_megabytes"] == 1024.0
        assert metrics["system/gpu_0_memory_usage_percentage"] == 25.0
        assert metrics["system/system_memory_usage_megabytes"] > 0


def test_without_nvml_host_metrics_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    samples = []
    with SystemMetrics(lambda metrics, step: samples.append(metrics), interval=60):
        pass
    assert samples and all(set(metrics) == {"system/cpu_utilization_percentage",
                                            "system/system_memory_usage_megabytes",
                                            "system/system_memory_usage_percentage"} for metrics in samples)


def test_disabled_monitor_samples_nothing(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(calls))
    samples = []
    with SystemMetrics(lambda metrics, step: samples.append(metrics), enabled=False):
        pass
    assert samples == [] and calls == []


def test_a_gpu_lost_mid_run_leaves_host_metrics(monkeypatch):
    calls: list[str] = []
    nvml = fake_nvml(calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    samples, first = [], threading.Event()

    def log(metrics: dict[str, float], step: int | None) -> None:
        samples.append(metrics)
        first.set()

    def lost(handle: int) -> None:
        raise RuntimeError("GPU is lost")

    with SystemMetrics(log, interval=60) as monitor:
        assert first.wait(10)
        nvml.nvmlDeviceGetUtilizationRates = lost
        monitor.record()
    assert "system/gpu_0_utilization_percentage" in samples[0]
    assert all("system/gpu_0_utilization_percentage" not in metrics and
               "system/cpu_utilization_percentage" in metrics for metrics in samples[1:])
    assert len(samples) == 3 and calls == ["init", "shutdown"]


def test_an_nvml_that_fails_to_shut_down_ends_the_monitor_quietly(monkeypatch):
    calls: list[str] = []
    nvml = fake_nvml(calls)

    def gone() -> None:
        raise RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")

    nvml.nvmlShutdown = gone
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    raised: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    samples = []
    with SystemMetrics(lambda metrics, step: samples.append(metrics), interval=60) as monitor:
        pass
    assert not monitor.thread.is_alive() and raised == [] and len(samples) == 2
