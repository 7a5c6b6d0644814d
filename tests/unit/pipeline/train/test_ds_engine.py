"""build_ds_config and the DeepSpeed engine's helpers: no process group, no DeepSpeed import."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import RunConfig, validate_config
from pipeline.distributed import DistEnv
from pipeline.errors import UserError
from pipeline.train import ds_engine
from pipeline.train.ds_engine import build_ds_config, saved_world_size
from tests.fixtures import causal_config

REPO = Path(__file__).resolve().parents[4]


def run_config(tmp_path: Path, deepspeed: dict | None = None, **train) -> RunConfig:
    train = {"strategy": "deepspeed", "micro_batch_size": 4, "grad_accum": 2, **train}
    if deepspeed is not None:
        train["deepspeed"] = deepspeed
    return validate_config(causal_config(tmp_path, tmp_path / "model", tmp_path / "data.jsonl", train=train))


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("name,stage,offload", [("zero1", 1, None), ("zero2", 2, None),
                                                ("zero3", 3, None), ("zero3_offload", 3, "cpu")])
def test_shipped_configs_fill_auto_fields(tmp_path, name, stage, offload):
    cfg = run_config(tmp_path, {"config": str(REPO / "ds_configs" / f"{name}.json")},
                     max_grad_norm=0.5, precision="bf16")
    config = build_ds_config(cfg, world_size=3)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 4 * 2 * 3
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage"] == stage
    assert config["zero_optimization"].get("offload_param", {}).get("device") == offload
    assert config["zero_optimization"].get("offload_optimizer", {}).get("device") == offload
    assert config["steps_per_print"] >= 10**6 and config["wall_clock_breakdown"] is False
    assert "auto" not in json.dumps(config)


def test_fields_without_file(tmp_path):
    cfg = run_config(tmp_path, {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
                     max_grad_norm=None)
    config = build_ds_config(cfg, world_size=2)
    assert without_buckets(config["zero_optimization"]) == {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert config["gradient_clipping"] == 0.0
    assert config["bf16"]["enabled"] is False
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["train_batch_size"] == 16


def test_conflicting_batch_size_names_both(tmp_path):
    path = write_json(tmp_path / "ds.json", {"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(UserError) as err:
        build_ds_config(run_config(tmp_path, {"config": path}), world_size=1)
    assert str(err.value) == f"{path}: train_micro_batch_size_per_gpu is 8 but train.micro_batch_size is 4"


@pytest.mark.parametrize("data,words", [
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps is 4", "train.grad_accum is 2"]),
    ({"train_batch_size": 64}, ["train_batch_size is 64", "2 ranks"]),
    ({"gradient_clipping": 2.0}, ["gradient_clipping is 2.0", "train.max_grad_norm is 1.0"]),
    ({"bf16": {"enabled": True}},
     ["bf16.enabled is true but train.precision 'fp32', so bf16.enabled is false"]),
    ({"fp16": {"enabled": True}}, ["fp16.enabled is true"]),
    ({"optimizer": {"type": "Adam"}}, ["'optimizer' section"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["'scheduler' section"]),
])
def test_file_conflicts(tmp_path, data, words):
    path = write_json(tmp_path / "ds.json", data)
    with pytest.raises(UserError) as err:
        build_ds_config(run_config(tmp_path, {"config": path}), world_size=2)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_explicit_equal_values_are_accepted(tmp_path):
    path = write_json(tmp_path / "ds.json", {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1,
                                             "bf16": {"enabled": False}, "zero_optimization": {"stage": 1}})
    config = build_ds_config(run_config(tmp_path, {"config": path}), world_size=1)
    assert config["zero_optimization"]["stage"] == 1  # the file wins over the default zero_stage


def test_explicit_zero_fields_must_agree_with_file(tmp_path):
    path = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 3}})
    with pytest.raises(UserError, match=r"zero_optimization.stage is 3 but train.deepspeed.zero_stage is 2"):
        build_ds_config(run_config(tmp_path, {"config": path, "zero_stage": 2}), world_size=1)
    cfg = run_config(tmp_path, {"config": path, "offload_optimizer": "cpu"})
    offload = build_ds_config(cfg, world_size=1)["zero_optimization"]["offload_optimizer"]
    assert offload == {"device": "cpu"}


def test_relative_path_resolves_against_cwd(tmp_path, monkeypatch):
    write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 1}})
    monkeypatch.chdir(tmp_path)
    assert build_ds_config(run_config(tmp_path, {"config": "ds.json"}), 1)["zero_optimization"]["stage"] == 1


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match=r"^.*missing\.json: cannot read DeepSpeed config"):
        build_ds_config(run_config(tmp_path, {"config": str(tmp_path / "missing.json")}), 1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(UserError, match=r"bad\.json:1: invalid JSON"):
        build_ds_config(run_config(tmp_path, {"config": str(bad)}), 1)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"bad\.json: a DeepSpeed config must be a JSON object"):
        build_ds_config(run_config(tmp_path, {"config": str(bad)}), 1)


def test_the_file_is_not_modified(tmp_path):
    data = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    path = write_json(tmp_path / "ds.json", data)
    build_ds_config(run_config(tmp_path, {"config": path}), 1)
    assert json.loads(Path(path).read_text()) == data


def test_saved_world_size(tmp_path):
    (tmp_path / "deepspeed").mkdir()
    for rank in range(3):
        (tmp_path / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_world_size(tmp_path) == 3
    (tmp_path / "meta.json").write_text(json.dumps({"format": "deepspeed", "world_size": 2}))
    assert saved_world_size(tmp_path) == 2
    with pytest.raises(UserError, match="no DeepSpeed checkpoint"):
        saved_world_size(tmp_path / "deepspeed")


def test_optimizer_groups_use_real_shapes_of_zero3_shards(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    model[0].weight.ds_shape = (3, 3)  # as zero.Init leaves it: data is an empty 1-d shard
    model[0].weight.data = torch.empty(0)
    optimizer = ds_engine._client_optimizer(model, run_config(tmp_path, weight_decay=0.1))
    decay, plain = optimizer.param_groups
    assert decay["params"] == [model[0].weight] and decay["weight_decay"] == 0.1
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_engine_needs_a_process_group(tmp_path):
    with pytest.raises(RuntimeError, match="process group"):
        ds_engine.DeepSpeedEngine(run_config(tmp_path), DistEnv(), lambda: torch.nn.Linear(2, 2), None)


def test_file_without_zero_section_gets_the_fields(tmp_path):
    path = write_json(tmp_path / "ds.json", {"gradient_clipping": "auto"})
    config = build_ds_config(run_config(tmp_path, {"config": path}), 1)
    # The default stage; "none" offloads are left out.
    assert without_buckets(config["zero_optimization"]) == {"stage": 2}


def test_defaults_without_file(tmp_path):
    config = build_ds_config(run_config(tmp_path), 1)
    assert without_buckets(config["zero_optimization"]) == {"stage": 2}
    assert config["train_batch_size"] == 8 and config["gradient_clipping"] == 1.0


def test_explicit_offload_none_conflicts_with_file(tmp_path):
    path = REPO / "ds_configs" / "zero3_offload.json"
    message = r'offload_param.device is "cpu" but train.deepspeed.offload_params is "none"'
    with pytest.raises(UserError, match=message):
        build_ds_config(run_config(tmp_path, {"config": str(path), "offload_params": "none"}), 1)


def test_repair_optimizer_after_universal_load():
    first, second = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    base = torch.optim.AdamW([{"params": [first], "weight_decay": 0.1},
                              {"params": [second], "weight_decay": 0.0}])
    shared = torch.tensor(3.0)
    base.state[first]["step"], base.state[second]["step"] = shared, shared
    base.param_groups[1]["weight_decay"] = 0.1  # what the universal loader leaves behind
    engine = object.__new__(ds_engine.DeepSpeedEngine)
    engine.model = SimpleNamespace(optimizer=SimpleNamespace(optimizer=base, param_groups=base.param_groups))
    engine._weight_decay = [0.1, 0.0]
    engine._repair_optimizer()
    assert [g["weight_decay"] for g in base.param_groups] == [0.1, 0.0]
    assert base.state[first]["step"] is not base.state[second]["step"]
    assert float(base.state[second]["step"]) == 3.0


def without_buckets(zero: dict) -> dict:
    return {k: v for k, v in zero.items() if "bucket" not in k and not k.startswith("stage3_")}


def test_buckets_are_sized_from_the_model_unless_the_file_sets_them(tmp_path):
    config_file = tmp_path / "ds.json"
    config_file.write_text('{"zero_optimization": {"stage": 3, "reduce_bucket_size": 12345,'
                           ' "stage3_prefetch_bucket_size": "auto"}}')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    cfg = validate_config({"name": "b", "model": {"name_or_path": str(model)}, "data": {"train": ["x"]},
                           "train": {"strategy": "deepspeed", "deepspeed": {"config": str(config_file)}}})
    zero = build_ds_config(cfg, 2)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345  # explicit values win
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
