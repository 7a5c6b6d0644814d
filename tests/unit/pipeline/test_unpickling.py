"""Run and checkpoint directories never execute code: a pickle payload planted in any file ftpipe
reads is refused, by name, and never runs. (DeepSpeed's own loader: tests/unit/pipeline/train/test_engine.py,
in the process that builds a DeepSpeed engine anyway.)"""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from launch.slurm_jobs import JobRecord, record_jobs, status_lines
from pipeline import distributed
from pipeline.checkpoint_readers import open_checkpoint
from pipeline.config import validate_config
from pipeline.errors import UserError
from pipeline.run_dir import RunDir
from pipeline.train import checkpoint
from pipeline.train.build import build_engine
from tests.fixtures import causal_config
from tests.unit.pipeline.train.test_checkpoint import TinyEngine


class Payload:
    """Unpickling this runs `touch MARKER`: the marker file proves the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _recorded_job(tmp_path: Path) -> tuple[RunDir, Path]:
    """A train job recorded in jobs.json, gone from SLURM (no cluster here); its folder."""
    run = RunDir(tmp_path / "run")
    folder = run.slurm_dir / "4242"
    folder.mkdir(parents=True)
    logs = [str(folder / f"4242_0_log.{kind}") for kind in ("out", "err")]
    record_jobs(run, [JobRecord("train", "4242", *logs)])
    return run, folder


def _plant_status(tmp_path: Path, marker: Path) -> tuple[Path, callable]:
    """A payload as submitit's result pickle of the job."""
    run, folder = _recorded_job(tmp_path)
    target = folder / "4242_0_result.pkl"
    target.write_bytes(pickle.dumps(("error", Payload(marker))))
    return target, lambda: status_lines(run)


def _plant_rng(tmp_path: Path, marker: Path) -> tuple[Path, callable]:
    folder = checkpoint.save_checkpoint(tmp_path / "ckpt", 2, TinyEngine(), {"step": 2})
    target = folder / "rng-rank0.pt"
    torch.save({"python": Payload(marker)}, target)
    return target, lambda: checkpoint.load_checkpoint(folder, TinyEngine())


def _plant_deepspeed(tmp_path: Path, marker: Path) -> tuple[Path, callable]:
    folder = tmp_path / "step-000002"
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"format": "deepspeed", "world_size": 1}))
    target = folder / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": Payload(marker)}}, target)
    return target, lambda: open_checkpoint(folder)


def _plant_dcp(tmp_path: Path, marker: Path) -> tuple[Path, callable]:
    """DCP's .metadata can only be read by unpickling: a group-writable one is refused."""
    folder = tmp_path / "step-000002"
    (folder / "dcp").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"format": "dcp", "world_size": 1}))
    target = folder / "dcp" / ".metadata"
    target.write_bytes(pickle.dumps(Payload(marker)))
    target.chmod(0o664)
    return target, lambda: open_checkpoint(folder)


@pytest.mark.parametrize("plant", [_plant_status, _plant_rng, _plant_deepspeed, _plant_dcp],
                         ids=["status-result-pickle", "rng-state", "deepspeed-reader", "dcp-metadata"])
def test_a_planted_payload_never_runs(tmp_path, plant):
    marker = tmp_path / "payload-ran"
    target, read = plant(tmp_path, marker)
    try:
        lines = read()
    except UserError as err:
        assert str(target) in str(err) and "\n" not in str(err)
    else:  # status: the pickle is not read at all, the stage is shown without it
        assert any("train" in line and "unknown" in line for line in lines), lines
    assert not marker.exists(), "the payload ran"
    with open(target, "rb") as handle:  # the payload is live: a plain unpickler runs it
        try:
            torch.load(handle, weights_only=False) if target.suffix == ".pt" else pickle.load(handle)
        except Exception:  # noqa: BLE001 - the loaded object is not what the reader expects; it ran
            pass
    assert marker.exists()


def test_status_reads_the_outcome_the_job_wrote(tmp_path):
    run, folder = _recorded_job(tmp_path)
    (folder / "outcome.json").write_text('{"outcome": "failed"}')
    assert any(line.split()[:2] == ["train", "failed"] for line in status_lines(run))


def test_a_checkpoint_file_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    target, read = _plant_dcp(tmp_path, tmp_path / "payload-ran")
    target.chmod(0o644)
    os.chown(target, 65534, 65534)
    with pytest.raises(UserError, match="owned by uid 65534"):
        read()
    assert not (tmp_path / "payload-ran").exists()


def test_resuming_fsdp_refuses_a_group_writable_metadata_file(tmp_path, tiny_llama):
    train = {"strategy": "fsdp"}
    cfg = validate_config(causal_config(tmp_path, tiny_llama, tmp_path / "data.jsonl", train=train))
    dist = distributed.init(need_group=True)
    try:
        engine = build_engine(cfg, dist)
        folder = tmp_path / "step-000001"
        engine.save(folder)
        engine.load(folder)  # what it wrote itself loads
        marker = tmp_path / "payload-ran"
        metadata = folder / "dcp" / ".metadata"
        metadata.write_bytes(pickle.dumps(Payload(marker)))
        metadata.chmod(0o666)
        with pytest.raises(UserError, match=r"\.metadata: writable by group or others"):
            engine.load(folder)
        assert not marker.exists()
    finally:
        distributed.shutdown()


def test_checkpoints_saved_under_a_group_writable_umask_are_not_group_writable(tmp_path):
    previous = os.umask(0o002)
    try:
        folder = checkpoint.save_checkpoint(tmp_path, 2, TinyEngine(), {"step": 2})
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o022 for p in folder.iterdir()}
    assert all(mode == 0 for name, mode in modes.items() if name != checkpoint.MARKER), modes


def test_random_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    folder = checkpoint.save_checkpoint(tmp_path, 2, TinyEngine(), {"step": 2})
    torch.load(folder / "rng-rank0.pt", weights_only=True)  # no numpy arrays, nothing to allow
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for _ in range(3):
        random.random(), np.random.rand(), torch.rand(1)
    checkpoint.load_checkpoint(folder, TinyEngine())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_random_state_files_of_earlier_versions_still_load(tmp_path):
    import random

    import numpy as np

    folder = checkpoint.save_checkpoint(tmp_path, 2, TinyEngine(), {"step": 2})
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": None}, folder / "rng-rank0.pt")
    expected = np.random.rand()
    checkpoint.load_checkpoint(folder, TinyEngine())
    assert np.random.rand() == expected
