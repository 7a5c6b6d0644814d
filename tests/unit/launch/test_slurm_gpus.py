"""The GPUs and partitions the rendered sbatch scripts ask for (no cluster needed to render them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.slurm import render_script
from pipeline.config import validate_config
from pipeline.run_dir import RunDir
from tests.fixtures import causal_config


def script(tmp_path: Path, model: Path | str, stage: str, slurm: dict | None = None, **sections) -> str:
    launch = {"backend": "slurm", "nproc_per_node": 2,
              "slurm": {"partition": "gpu", "cpu_partition": "cpu", **(slurm or {})}}
    train = {"strategy": "ddp", **sections.pop("train", {})}
    raw = causal_config(tmp_path, Path(model), tmp_path / "t.jsonl", launch=launch, train=train, **sections)
    cfg = validate_config({**raw, "model": {**raw["model"], "name_or_path": str(model)}})
    return render_script(cfg, stage, RunDir(tmp_path / "runs" / "lm"), tmp_path)


def gpus(text: str) -> str | None:
    found = [line for line in text.splitlines() if line.startswith("#SBATCH --gpus-per-node=")]
    return found[0].split("=", 1)[1] if found else None


def test_train_asks_for_one_gpu_per_rank(tmp_path, tiny_llama):
    text = script(tmp_path, tiny_llama, "train")
    assert gpus(text) == "2" and "#SBATCH --partition=gpu" in text


@pytest.mark.parametrize("slurm, train, expected", [
    ({}, {"device": "cpu"}, None),  # training on the CPU asks for no GPU
    ({"gpus_per_node": 4}, {}, "4"),  # an explicit count wins
    ({"gpus_per_node": 4}, {"device": "cpu"}, "4"),
    ({"gpus_per_node": 0}, {}, None),
])
def test_train_gpus_follow_device_and_an_explicit_count(tmp_path, tiny_llama, slurm, train, expected):
    assert gpus(script(tmp_path, tiny_llama, "train", slurm, train=train)) == expected


def test_one_rank_per_gpu_asks_for_the_count_given(tmp_path, tiny_llama):
    raw = causal_config(tmp_path, tiny_llama, tmp_path / "t.jsonl", train={"strategy": "fsdp"},
                        launch={"backend": "slurm", "nproc_per_node": "gpu", "slurm": {"gpus_per_node": 8}})
    text = render_script(validate_config(raw), "train", RunDir(tmp_path / "runs" / "lm"), tmp_path)
    assert gpus(text) == "8"


def test_evaluate_goes_to_the_gpu_partition_only_for_a_large_model(tmp_path, tiny_llama):
    small = script(tmp_path, tiny_llama, "evaluate")
    assert "#SBATCH --partition=cpu" in small and gpus(small) is None
    large = script(tmp_path, tiny_llama, "evaluate", {"large_model_gb": 1e-6})  # the tiny model is ~100 kB
    assert "#SBATCH --partition=gpu" in large and gpus(large) == "2"
    hub = script(tmp_path, "org/unknown-size", "evaluate")  # its size cannot be measured here
    assert "#SBATCH --partition=gpu" in hub
    consolidate = script(tmp_path, tiny_llama, "consolidate", {"large_model_gb": 1e-6})  # no such trait
    assert "#SBATCH --partition=cpu" in consolidate and gpus(consolidate) is None
