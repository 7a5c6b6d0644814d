"""train.device: no silent CPU fallback, the backend that follows the device, nproc_per_node 'gpu',
flash attention's CUDA check where the stage runs, and the CUDA allocator's default.

This machine has no GPU: where a test needs CUDA to be present it fakes torch.cuda.is_available /
device_count (monkeypatch); nothing here initialises CUDA or NCCL.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist

from launch.torchrun import _worker_env, check_gpu_ranks, torchrun_command
from pipeline import distributed
from pipeline.config import validate_config
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.run_dir import RunDir
from pipeline.train import stage as train_stage

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a machine without CUDA")


def config(**sections) -> dict:
    base = {"name": "x", "model": {"name_or_path": "m"}, "data": {"train": ["t.jsonl"], "format": "text"}}
    return {**base, **sections}


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'present' without a GPU: only for code that asks, never for code that uses it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def warnings_seen():
    logger, records = logging.getLogger("ftpipe"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_cpu_trains_with_gloo_even_where_cuda_exists(fake_cuda):
    assert distributed.choose_device("auto") == "cuda" and distributed.choose_device("cpu") == "cpu"
    env = distributed.init(need_group=True, device="cpu")
    try:
        assert env.device == torch.device("cpu") and dist.get_backend() == "gloo"
        assert distributed.current().device_type == "cpu"
    finally:
        distributed.shutdown()


def test_cuda_without_a_gpu_is_one_line_naming_the_node_and_the_key():
    cfg = validate_config(config(train={"device": "cuda"}))
    with pytest.raises(UserError) as err:
        train_stage.run(cfg, None)  # refused before the stage reads anything
    message = str(err.value)
    assert message.startswith("train.device: cuda, but node ") and socket.gethostname() in message
    assert "\n" not in message


@pytest.mark.parametrize("environ, warned", [
    ({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, True),  # torchrun, 2 ranks on this node
    ({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False),  # said once per node, by local rank 0
    ({"SLURM_JOB_ID": "7"}, True),  # a SLURM train job
    ({}, False),  # one process on a laptop: the CPU is expected
])
def test_auto_falling_back_to_the_cpu_warns_once_per_node(warnings_seen, environ, warned):
    assert distributed.choose_device("auto", warn_cpu_fallback=True, environ=environ) == "cpu"
    lines = [r.getMessage() for r in warnings_seen if r.levelno == logging.WARNING]
    assert len(lines) == int(warned)
    if warned:
        assert "no CUDA GPU on node" in lines[0] and "train.device" in lines[0] and "\n" not in lines[0]


def test_expandable_segments_by_default_unless_the_user_set_the_allocator(tmp_path, monkeypatch):
    for key in distributed.ALLOC_CONF_ENV:
        monkeypatch.delenv(key, raising=False)
    env = _worker_env(StageContext(RunDir(tmp_path)))  # torchrun's ranks
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    with pytest.raises(UserError):
        train_stage.run(validate_config(config(train={"device": "cuda"})), None)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # in-process, set first
    users = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}
    distributed.default_alloc_conf(users)
    assert users == {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}


def test_nproc_per_node_gpu_is_torchruns_convention(monkeypatch):
    launch = {"backend": "torchrun", "nproc_per_node": "gpu"}
    cfg = validate_config(config(launch=launch, train={"strategy": "ddp"}))
    assert "--nproc-per-node=gpu" in torchrun_command(cfg.launch, "x", [])
    with pytest.raises(UserError, match=r"but node .* has no visible CUDA GPU"):
        check_gpu_ranks(cfg.launch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # faked: 2 GPUs visible
    check_gpu_ranks(cfg.launch)


@pytest.mark.parametrize("launch, train, why", [
    ({"nproc_per_node": "gpu"}, {"strategy": "ddp"}, "needs launch.backend torchrun or slurm"),
    ({"backend": "torchrun", "nproc_per_node": "gpu"}, {}, "train.strategy ddp, fsdp or deepspeed"),
    ({"backend": "torchrun", "nproc_per_node": "gpu"}, {"strategy": "ddp", "device": "cpu"}, "auto or cuda"),
    ({"backend": "slurm", "nproc_per_node": "gpu"}, {"strategy": "ddp"}, "needs launch.slurm.gpus_per_node"),
])
def test_nproc_per_node_gpu_where_it_cannot_be_counted_is_refused(launch, train, why):
    with pytest.raises(UserError, match=why) as err:
        validate_config(config(launch=launch, train=train))
    assert "\n" not in str(err.value)


@pytest.fixture
def flash_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real(name, *a))


def test_flash_attention_under_slurm_is_checked_in_the_job_not_at_submit(flash_installed):
    flash = {"name_or_path": "m", "attn_implementation": "flash_attention_2"}
    cfg = validate_config(config(model=flash, launch={"backend": "slurm"}))  # a login node has no GPU
    with pytest.raises(UserError) as err:
        train_stage.run(cfg, None)  # the job's node has none either
    assert str(err.value).startswith("model.attn_implementation: flash_attention_2 needs a CUDA GPU")
    assert f"node {socket.gethostname()}" in str(err.value)
    with pytest.raises(UserError, match="needs CUDA but train.device is cpu"):
        validate_config(config(model=flash, launch={"backend": "slurm"}, train={"device": "cpu"}))


def test_each_rank_gets_its_share_of_the_cores_as_threads(monkeypatch):
    """torchrun's OMP_NUM_THREADS=1 would leave 15 of 16 cores idle for 2 ranks on a CPU node."""
    assert distributed.rank_threads({"LOCAL_WORLD_SIZE": "2"}, cores=16) == 8
    assert distributed.rank_threads({}, cores=16) == 16
    assert distributed.rank_threads({"LOCAL_WORLD_SIZE": "4"}, cores=2) == 1
    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    torch.set_num_threads(7)
    try:
        distributed.init(need_group=False)
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        torch.set_num_threads(before)
