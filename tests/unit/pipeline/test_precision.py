"""Which precision training runs in: bf16 only where the hardware has it (a fake CPU's flags)."""

import pytest
import torch

from pipeline import precision
from pipeline.config import TrainConfig
from tests.helpers import ftpipe

X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu avx2 {extra}\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\n"


@pytest.mark.parametrize("text, extra, native", [(X86, "", False), (X86, "avx512f avx512_bf16", True),
                                                (X86, "amx_bf16 amx_tile", True), (ARM, "", False),
                                                (ARM, "bf16 i8mm", True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, text, extra, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text.format(extra=extra))
    flags = precision.cpu_flags(cpuinfo)
    assert "avx2" in flags or "asimd" in flags
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
    assert precision.native_bf16(torch.device("cpu")) is native


def test_no_cpuinfo_means_no_flags(tmp_path):
    assert precision.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags, train, expected", [
    ({"avx2"}, {"precision": "bf16"}, "fp32"),
    ({"avx2"}, {"precision": "bf16", "allow_slow_bf16": True}, "bf16"),
    ({"avx2", "avx512_bf16"}, {"precision": "bf16"}, "bf16"),
    ({"avx2"}, {"precision": "fp32"}, "fp32"),
])
def test_bf16_on_a_cpu_without_it_trains_in_fp32_unless_allowed(monkeypatch, flags, train, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    chosen, warning = precision.trained_precision(TrainConfig(**train), torch.device("cpu"))
    assert chosen == expected
    assert (warning is not None) == (train["precision"] == "bf16" and expected == "fp32")


def test_the_measured_cost_is_a_ratio_of_two_timings():
    assert precision.bf16_slowdown(size=32) > 0


def test_validate_warns_in_one_line(tmp_path, monkeypatch, capsys, tiny_llama, text_data):
    from tests import fixtures

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    cfg = fixtures.causal_config(tmp_path, tiny_llama, text_data, train={"precision": "bf16"})
    assert ftpipe("validate", fixtures.write_config(tmp_path / "c.yaml", cfg)) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "bf16" in line]
    assert len(lines) == 1 and lines[0].startswith("ftpipe: warning: train.precision bf16:")
    assert "slower than fp32 here" in lines[0] and "allow_slow_bf16" in lines[0]
