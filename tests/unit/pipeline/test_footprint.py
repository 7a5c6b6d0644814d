"""`ftpipe plan`'s estimates: parameters from config.json on the meta device, model states against what
benchmarks/memory.py measured, DeepSpeed's own estimators, recommendations and the command line."""

import json

import pytest

from pipeline.config import RunConfig
from pipeline.footprint import footprint, model_shape
from tests import fixtures
from tests.helpers import ftpipe

GIB = 2**30
# benchmarks/memory.py's model (docs/benchmarks.md, "memory"): a 134.1M-parameter Llama, 2 ranks, bf16.
MEMORY_BENCHMARK_MODEL = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 768,
                          "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "num_key_value_heads": 12, "tie_word_embeddings": False}
# Model state per rank it measured (GiB): every live tensor storage before an optimizer step.
MEASURED_STATE_GIB = {"ddp": 2.00, "zero2": 1.12, "zero3": 1.00, "fsdp": 1.00}


def config(tmp_path, model_dir, **sections) -> RunConfig:
    raw = fixtures.causal_config(tmp_path, model_dir, tmp_path / "none.jsonl", train={"strategy": "ddp"})
    return RunConfig.model_validate(fixtures.merge(raw, sections))


@pytest.fixture
def benchmark_model(tmp_path):
    return fixtures.fake_model_dir(tmp_path / "m134", MEMORY_BENCHMARK_MODEL)


def test_parameters_come_from_config_json_without_weights(tmp_path, benchmark_model):
    shape = model_shape(config(tmp_path, benchmark_model))
    assert shape.parameters == shape.trainable
    assert abs(shape.parameters - 134.1e6) < 0.1e6
    assert shape.largest_layer == 32000 * 768  # the embedding (and the untied head)


def test_lora_and_freezing_count_only_what_trains(tmp_path, benchmark_model):
    full = model_shape(config(tmp_path, benchmark_model)).parameters
    lora = model_shape(config(tmp_path, benchmark_model,
                              model={"lora": {"r": 8, "target_modules": ["q_proj"]}}))
    assert lora.trainable == 12 * 8 * (768 + 768) and lora.parameters == full + lora.trainable
    frozen = model_shape(config(tmp_path, benchmark_model, train={"freeze": {"train_last_layers": 1}}))
    assert 0 < frozen.trainable < full


@pytest.mark.parametrize("strategy", sorted(MEASURED_STATE_GIB))
def test_model_states_are_within_15_percent_of_the_measured_ones(tmp_path, benchmark_model, strategy):
    cfg = config(tmp_path, benchmark_model, train={"precision": "bf16"},
                 launch={"backend": "torchrun", "nproc_per_node": 2})
    estimated = footprint(cfg)["strategies"][strategy]["model_states_bytes"] / GIB
    assert estimated == pytest.approx(MEASURED_STATE_GIB[strategy], rel=0.15)


def test_deepspeed_estimates_are_deepspeeds_own(tmp_path, benchmark_model):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = config(tmp_path, benchmark_model, launch={"backend": "slurm", "nproc_per_node": 4, "nnodes": 2})
    plan = footprint(cfg)
    p, largest = plan["parameters"]["total"], plan["parameters"]["largest_layer"]
    assert plan["deepspeed_estimates"] == {
        "zero2": estimate_zero2_model_states_mem_needs(p, 4, 2, cpu_offload=False)[1],
        "zero3": estimate_zero3_model_states_mem_needs(p, largest, 4, 2, cpu_offload=False,
                                                       cpu_offload_params=False)[1],
        "zero3_offload": estimate_zero3_model_states_mem_needs(p, largest, 4, 2, cpu_offload=True,
                                                               cpu_offload_params=False)[1]}


def test_checkpointing_and_sharding_lower_the_total(tmp_path, benchmark_model):
    cfg = config(tmp_path, benchmark_model, data={"max_seq_len": 2048}, train={"micro_batch_size": 4},
                 launch={"backend": "torchrun", "nproc_per_node": 8})
    rows = footprint(cfg)["strategies"]
    assert rows["ddp"]["activations_checkpointed_bytes"] < rows["ddp"]["activations_full_bytes"] / 5
    states = [rows[s]["model_states_bytes"] for s in ("ddp", "zero1", "zero2", "zero3")]
    assert states == sorted(states, reverse=True) and rows["fsdp"]["model_states_bytes"] < states[2]
    assert rows["zero3_offload"]["host_bytes"] > 0 and rows["zero3"]["host_bytes"] == 0
    # logits: tokens x vocab x (4 fp32 logits + 8 for their log-softmax and gradient)
    assert rows["ddp"]["logits_bytes"] == 4 * 2048 * 32000 * 12


@pytest.mark.parametrize("gpu_gb, expected", [
    (80, {"strategy": "ddp", "micro_batch_size": 4, "activation_checkpointing": False}),
    (8, {"strategy": "ddp", "micro_batch_size": 2, "activation_checkpointing": False}),
    (6, {"strategy": "zero2", "micro_batch_size": 2, "activation_checkpointing": False}),
    (2, {"strategy": "zero2", "micro_batch_size": 1, "activation_checkpointing": True}),
    (1, {"strategy": None}),
])
def test_the_recommendation_keeps_the_micro_batch_then_shards_then_checkpoints(tmp_path, benchmark_model,
                                                                                gpu_gb, expected):
    cfg = config(tmp_path, benchmark_model, data={"max_seq_len": 2048}, train={"micro_batch_size": 4},
                 launch={"backend": "torchrun", "nproc_per_node": 8, "gpu_memory_gb": gpu_gb})
    recommendation = footprint(cfg)["recommendation"]
    assert {k: recommendation[k] for k in expected} == expected
    if expected["strategy"]:
        assert recommendation["total_bytes"] <= 0.9 * gpu_gb * GIB


def test_plan_prints_a_table_and_json_and_times_from_a_finished_run(tmp_path, tiny_llama, text_data, capsys):
    done = fixtures.write_config(tmp_path / "done.yaml",
                                 fixtures.causal_config(tmp_path, tiny_llama, text_data, name="done"))
    assert ftpipe("run", done, "--no-progress", "--stages", "shard,tokenize,train") == 0
    new = fixtures.write_config(tmp_path / "new.yaml", fixtures.causal_config(
        tmp_path, tiny_llama, text_data, name="new", train={"max_steps": 60}, launch={"gpu_memory_gb": 1}))
    capsys.readouterr()
    assert ftpipe("plan", new) == 0
    table = capsys.readouterr().out
    assert all(s in table for s in ("ddp", "zero3_offload", "fsdp"))
    assert "recommendation for 1.0 GiB per GPU: ddp," in table
    assert "measured by run done" in table
    assert ftpipe("plan", new, "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["strategies"]) == {"ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp"}
    assert set(plan["strategies"]["zero3"]) >= {"model_states_bytes", "activations_bytes", "total_bytes"}
    assert plan["time"]["from_run"] == "done" and plan["time"]["steps"] == 60 and plan["time"]["seconds"] > 0
    assert not (tmp_path / "runs" / "new").exists(), "plan writes nothing"
