"""A train job across two SLURM nodes (network namespaces): srun starts one torchrun per node, node
rank from SLURM_NODEID, rendezvous at the first node's address. The result must equal two ranks on
one machine."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.run_dir import RunDir
from tests import fixtures
from tests.cluster.test_slurm import wait_for
from tests.helpers import assert_close_weights, ftpipe, losses, manifest, weights

# device cpu: these clusters have no GPUs, and the train job would otherwise ask for one per rank.
BATCH = {"max_steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "checkpoint_every": 2, "lr": 1e-3,
         "device": "cpu"}
STRATEGIES = {"fsdp": {"strategy": "fsdp"},
              "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}}


@pytest.fixture(autouse=True)
def no_jobs_left(two_node_cluster):
    yield
    two_node_cluster.cancel_all_jobs()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_two_node_train_job_equals_two_ranks_on_one_machine(two_node_cluster, tmp_path, tiny_llama,
                                                              text_data, name):
    train = {**BATCH, **STRATEGIES[name]}
    local = fixtures.causal_config(tmp_path / "local", tiny_llama, text_data, name=name, train=train,
                                   launch={"backend": "torchrun", "nproc_per_node": 2})
    assert ftpipe("run", fixtures.write_config(tmp_path / "local.yaml", local), "--no-progress",
                  "--stages", "shard,tokenize,train,consolidate") == 0
    # Inside a node's namespace only eth1 reaches the other node; gloo must not pick another interface.
    slurm = {"backend": "slurm", "nnodes": 2, "nproc_per_node": 1,
             "slurm": {"setup": ["export GLOO_SOCKET_IFNAME=eth1"]}}
    config = fixtures.write_config(tmp_path / "multi.yaml", fixtures.causal_config(
        tmp_path, tiny_llama, text_data, name=name, train=train, launch=slurm))
    # The data stages as job arrays are test_slurm's business: here they run locally, so the
    # submission is the train job across two nodes and the consolidate job that checks its result.
    assert ftpipe("run", config, "--stages", "shard,tokenize", "--no-progress") == 0
    assert ftpipe("submit", config, "--stages", "train,consolidate") == 0
    run = RunDir(tmp_path / "runs" / name)
    lines = wait_for(run, timeout=400)
    assert all(line.split()[1] == "done" for line in lines[:4]), "\n".join(lines)
    train_job = manifest(run, "train")
    assert train_job["world_size"] == 2
    job_id = next(line.split("job ")[1].split()[0] for line in lines if line.strip().startswith("train"))
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=two_node_cluster.env,
                           capture_output=True, text=True).stdout
    assert "NumNodes=2" in shown and "NodeList=ftpn[1-2]" in shown, shown
    reference = tmp_path / "local" / "runs" / name
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    assert_close_weights(weights(run), weights(reference), rtol=1e-5, atol=1e-6)
