"""The checks before a run that the corpus (tests/bad_inputs) does not reach: real safetensors files
pass, a truncated one does not, and the memory a SLURM job asks for is what a batch is measured by."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline import preflight
from pipeline.config import RunConfig, validate_config
from pipeline.errors import UserError
from tests import fixtures

BIG_MODEL = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32}


def test_real_safetensors_pass_and_a_cut_one_is_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    weights = folder / "model.safetensors"
    save_file({"a": np.ones((64, 64), np.float32), "b": np.zeros(3, np.int64)}, str(weights),
              metadata={"format": "pt"})
    assert preflight.check_model(str(folder)) == {}
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model.safetensors: truncated \(\d+ bytes, its header lists \d+\)"):
        preflight.check_model(str(folder))


def _cfg(tmp_path, **slurm) -> RunConfig:
    return validate_config(fixtures.causal_config(
        tmp_path, tmp_path / "model", tmp_path / "d.jsonl", launch={"backend": "slurm", "slurm": slurm},
        train={"micro_batch_size": 64, "grad_accum": 1}, data={"max_seq_len": 4096}))


def test_slurm_jobs_are_measured_by_their_mem(tmp_path):
    # 64 x 4096 tokens x (32000 + 4096 x 32) x 4 bytes: about 160 GiB at least.
    with pytest.raises(UserError, match=r"more than launch.slurm.mem \(64.0 GiB\)"):
        preflight.check_memory(_cfg(tmp_path, mem="64G"), BIG_MODEL)
    preflight.check_memory(_cfg(tmp_path, mem="1T"), BIG_MODEL)
    preflight.check_memory(_cfg(tmp_path, mem="0"), BIG_MODEL)  # the whole node: unknown here
    preflight.check_memory(_cfg(tmp_path), BIG_MODEL)  # the cluster's default: unknown here
