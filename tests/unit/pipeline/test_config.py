"""The run config: loading, dotted overrides, and one-line errors that name the file, line and key.
(Paths and the CLI's exit codes: test_config_cli.py.)"""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.sources import check_paths
from tests.config_template import error_of, q

# --- a good config --------------------------------------------------------------------------


def test_valid_config_loads_with_defaults(write_cfg, tmp_path, model_dir, data_file):
    cfg = load_config(write_cfg())
    assert cfg.name == "demo"
    assert cfg.run_dir == tmp_path / "runs" / "demo"
    assert cfg.model.name_or_path == str(model_dir) and cfg.model.task == "causal_lm"
    assert cfg.model.num_labels is None
    assert cfg.data.train == [str(data_file)] and cfg.data.eval == []
    assert (cfg.data.format, cfg.data.eval_fraction, cfg.data.num_shards) == ("text", 0.2, 2)
    assert (cfg.data.max_seq_len, cfg.data.max_reject_fraction) == (128, 0.01)
    assert cfg.train.lr == 1e-3 and cfg.train.micro_batch_size == 4 and cfg.train.precision == "fp32"
    assert (cfg.train.grad_accum, cfg.train.max_steps, cfg.train.seed) == (1, None, 0)
    assert cfg.evaluate.batch_size == 32 and cfg.tracking.enabled is False
    check_paths(cfg)  # the data file and the model directory exist


def test_classification_config_takes_num_labels_from_labels(write_cfg):
    path = write_cfg({"  task: causal_lm": "  task: sequence_classification",
                      "  num_shards: 2": "  format: classification"})
    cfg = load_config(path, ["data.labels=[neg,neutral,pos]"])
    assert cfg.data.labels == ["neg", "neutral", "pos"]
    assert cfg.model.num_labels == 3


def test_overrides_apply_with_yaml_typing(write_cfg):
    cfg = load_config(write_cfg(), [
        "train.lr=1e-4", "data.train=[a.jsonl,b.jsonl]", "tracking.enabled=true", "train.max_grad_norm=null",
        "train.seed=7", "train.epochs=2.5", "evaluate.batch_size=4", "name=second-run",
        "data.eval_fraction=0"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.tracking.enabled is True
    assert cfg.train.max_grad_norm is None
    assert cfg.train.seed == 7 and cfg.train.epochs == 2.5
    assert cfg.evaluate.batch_size == 4  # a section absent from the file is created
    assert cfg.name == "second-run" and cfg.data.eval_fraction == 0.0
    assert cfg.train.micro_batch_size == 4  # untouched keys keep the file's value


def test_later_override_wins(write_cfg):
    cfg = load_config(write_cfg(), ["train.lr=1e-4", "train.lr=3e-4"])
    assert cfg.train.lr == 3e-4


# --- misspelled and unknown keys ------------------------------------------------------------


def test_misspelled_key_names_file_line_and_closest_key(write_cfg):
    path = write_cfg({"  eval_fraction: 0.2": "  eval_fration: 0.2"})
    assert error_of(path) == (
        f"{path}:8: unknown key 'data.eval_fration' (did you mean 'data.eval_fraction'?)")


def test_misspelled_key_in_another_section(write_cfg):
    path = write_cfg({"  micro_batch_size: 4": "  micro_batch_sise: 4"})
    assert error_of(path) == (
        f"{path}:12: unknown key 'train.micro_batch_sise' (did you mean 'train.micro_batch_size'?)")


def test_errors_in_flow_mappings_name_their_line(write_cfg, model_dir, data_file):
    text = (f"name: demo\nmodel: {{name_or_path: {q(model_dir)}}}\n"
            f"data: {{train: [{q(data_file)}],\n       num_shard: 3}}\ntrain: {{lr: 0.1}}\n")
    path = write_cfg(text=text)
    assert error_of(path) == f"{path}:4: unknown key 'data.num_shard' (did you mean 'data.num_shards'?)"
    path = write_cfg(text=text.replace("num_shard:", "num_shards:").replace("lr: 0.1", "lr: -1"))
    assert error_of(path) == f"{path}:5: train.lr: Input should be greater than 0 (got -1)"


def test_section_that_is_not_a_mapping(write_cfg, model_dir):
    path = write_cfg(text=f"name: demo\nmodel: {{name_or_path: {q(model_dir)}}}\ndata: [a.jsonl]\n")
    assert error_of(path) == (
        f"{path}:3: data: Input should be a valid dictionary or instance of DataConfig (got ['a.jsonl'])")


def test_misspelled_optional_top_level_section(write_cfg):
    path = write_cfg({"tracking:": "trackng:"})
    assert error_of(path) == f"{path}:14: unknown key 'trackng' (did you mean 'tracking'?)"


def test_unknown_key_without_a_close_match_has_no_hint(write_cfg):
    path = write_cfg({"  precision: fp32": "  zzzzzz: fp32"})
    assert error_of(path) == f"{path}:13: unknown key 'train.zzzzzz'"


@pytest.mark.parametrize("old, new, line, expected", [
    ("data:", "dta:", 6, "unknown key 'dta' (did you mean 'data'?)"),
    ("  train: [", "  trian: [", 7, "unknown key 'data.trian' (did you mean 'data.train'?)"),
], ids=["section", "key"])
def test_misspelled_required_key_still_suggests_the_closest(write_cfg, old, new, line, expected):
    path = write_cfg({old: new})
    assert f"{path}:{line}: {expected}" in error_of(path)


def test_unknown_key_in_override(write_cfg):
    path = write_cfg()
    assert error_of(path, "train.lrr=3") == f"{path}: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    assert error_of(path, "evalute.batch_size=3") == (
        f"{path}: unknown key 'evalute' (did you mean 'evaluate'?)")


# --- wrong types and impossible values -------------------------------------------------------


@pytest.mark.parametrize("old, new, expected", [
    ("  lr: 1.0e-3", "  lr: -1.0e-4", "{path}:11: train.lr: Input should be greater than 0 (got -0.0001)"),
    ("  lr: 1.0e-3", "  lr: 0", "{path}:11: train.lr: Input should be greater than 0 (got 0)"),
    ("  eval_fraction: 0.2", "  eval_fraction: 1.0",
     "{path}:8: data.eval_fraction: Input should be less than 1 (got 1.0)"),
    ("  eval_fraction: 0.2", "  eval_fraction: 1.5",
     "{path}:8: data.eval_fraction: Input should be less than 1 (got 1.5)"),
    ("  num_shards: 2", "  num_shards: 0",
     "{path}:9: data.num_shards: Input should be greater than or equal to 1 (got 0)"),
    ("  micro_batch_size: 4", "  micro_batch_size: eight",
     "{path}:12: train.micro_batch_size: Input should be a valid integer, unable to parse string as an "
     "integer (got 'eight')"),
    ("  precision: fp32", "  precision: fp16",
     "{path}:13: train.precision: Input should be 'fp32' or 'bf16' (got 'fp16')"),
    ("name: demo", "name: ../escape",
     "{path}:1: name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$' (got '../escape')"),
    ("  train: [", "  train: []  #",
     "{path}:7: data.train: List should have at least 1 item after validation, not 0 (got [])"),
    ("  task: causal_lm", "  task: sequence_classification",
     "{path}: model.task 'sequence_classification' needs data.format 'classification', got 'text'"),
    ("  num_shards: 2", "  format: classification",
     "{path}: model.task 'causal_lm' needs data.format 'text', got 'classification'"),
], ids=["negative-lr", "zero-lr", "eval-fraction-1", "eval-fraction-1.5", "num-shards-0", "batch-eight",
        "fp16", "bad-name", "empty-train", "task-needs-classification",
        "format-needs-classification-task"])
def test_bad_values_are_one_line_errors_naming_the_key(write_cfg, old, new, expected):
    path = write_cfg({old: new})
    assert error_of(path) == expected.format(path=path)


def test_every_error_is_reported_at_once_one_line_each(write_cfg):
    path = write_cfg({"  lr: 1.0e-3": "  lr: -1", "  precision: fp32": "  precision: fp16"})
    assert error_of(path).splitlines() == [
        f"{path}:11: train.lr: Input should be greater than 0 (got -1)",
        f"{path}:13: train.precision: Input should be 'fp32' or 'bf16' (got 'fp16')"]


@pytest.mark.parametrize("old, new, line, expected", [
    ("  lr: 1.0e-3", "  learning_rate: 1.0e-3", 11,
     "unknown key 'train.learning_rate' (ftpipe's key is 'train.lr'; 'learning_rate' is what "
     "HF TrainingArguments, axolotl call it)"),
    ("  micro_batch_size: 4", "  per_device_train_batch_size: 4", 12,
     "unknown key 'train.per_device_train_batch_size' (ftpipe's key is 'train.micro_batch_size'; "
     "'per_device_train_batch_size' is what HF TrainingArguments call it)"),
    ("  num_shards: 2", "  sequence_len: 32", 9,
     "unknown key 'data.sequence_len' (ftpipe's key is 'data.max_seq_len'; 'sequence_len' is what axolotl"),
    ("model:", "base_model:", 3, "unknown key 'base_model' (ftpipe's key is 'model.name_or_path'"),
])
def test_names_from_other_trainers_point_at_ours(write_cfg, old, new, line, expected):
    path = write_cfg({old: new})
    assert error_of(path).startswith(f"{path}:{line}: {expected}")


@pytest.mark.parametrize("overrides, expected", [
    (["model.num_labels=3", "data.labels=[neg,pos]"],
     "{path}: model.num_labels is 3 but data.labels has 2 names"),
    (["data.labels=[neg,neg]"], "{path}: data.labels has duplicate names"),
    (["model.num_labels=1"], "{path}: model.num_labels: Input should be greater than or equal to 2 (got 1)"),
], ids=["count-mismatch", "duplicates", "one-label"])
def test_classification_label_errors(write_cfg, overrides, expected):
    path = write_cfg({"  task: causal_lm": "  task: sequence_classification",
                      "  num_shards: 2": "  format: classification"})
    assert error_of(path, *overrides) == expected.format(path=path)


def test_bad_override_value_names_the_key(write_cfg):
    path = write_cfg()
    # keys the file does not set, so no file line is (wrongly) attached
    assert error_of(path, "train.grad_accum=0") == (
        f"{path}: train.grad_accum: Input should be greater than or equal to 1 (got 0)")
    assert error_of(path, "evaluate.compare_base=maybe") == (
        f"{path}: evaluate.compare_base: Input should be a valid boolean, unable to interpret input "
        "(got 'maybe')")


def test_bad_override_value_is_not_blamed_on_the_file_line(write_cfg):
    path = write_cfg()
    message = error_of(path, "train.lr=-1")
    assert "train.lr" in message and "(got -1)" in message
    assert not message.startswith(f"{path}:11:")


# --- unreadable configs and overrides ------------------------------------------------------------


def test_invalid_yaml_names_file_and_line(write_cfg):
    path = write_cfg({"  micro_batch_size: 4": "  micro_batch_size: [4"})
    message = error_of(path)
    assert message.startswith(f"{path}:13: invalid YAML: ")
    assert message == f"{path}:13: invalid YAML: expected ',' or ']', but got ':'"


def test_yaml_with_a_tab_names_its_line(write_cfg):
    path = write_cfg({"  precision: fp32": "\tprecision: fp32"})
    assert error_of(path) == f"{path}:13: invalid YAML: found character '\\t' that cannot start any token"


@pytest.mark.parametrize("text", ["- name\n- model\n", "just a string\n", "", "# only a comment\n"],
                         ids=["list", "scalar", "empty", "comment"])
def test_config_must_be_a_mapping(write_cfg, text):
    path = write_cfg(text=text)
    assert error_of(path) == f"{path}: the config must be a YAML mapping of sections (name, model, data, ...)"


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: cannot read config: [Errno 2] No such file or directory: '{path}'"


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert error_of(path).startswith(f"{path}: cannot read config: 'utf-8' codec can't decode byte 0xe9")


@pytest.mark.parametrize("item", ["train.lr", "=1", "train.=1", ".lr=1", "train..lr=1"])
def test_malformed_override(write_cfg, item):
    assert error_of(write_cfg(), item) == f"override {item!r}: expected KEY.SUB=VALUE, e.g. train.lr=1e-4"


def test_override_into_a_value_that_is_not_a_section(write_cfg):
    assert error_of(write_cfg(), "name.first=x") == "override 'name.first=x': 'name' is not a section"


# --- distributed launch and strategy keys -------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["launch.nproc_per_node=2"], "ask for 2 ranks; set launch.backend: torchrun"),
    (["launch.backend=torchrun", "launch.nproc_per_node=2"], "train.strategy 'single' cannot use 2 ranks"),
    (["launch.backend=torchrun", "train.strategy=ddp", "launch.nnodes=2"], "needs launch.rdzv_endpoint"),
    (["train.strategy=deepspeed", "train.deepspeed.offload_params=cpu"],
     "offload_params: cpu needs zero_stage: 3"),
    (["train.deepspeed.config=ds_configs/zero3.json"], "train.strategy is not 'deepspeed'"),
    (["train.strategy=zero3"], "train.strategy: Input should be 'single', 'ddp', 'deepspeed' or 'fsdp'"),
    (["train.fsdp.reshard=false"],
     "unknown key 'train.fsdp.reshard' (did you mean 'train.fsdp.reshard_after_forward'?)"),
    (["model.lora.rank=4"], "unknown key 'model.lora.rank'"),
])
def test_distributed_settings_are_checked_with_one_line_errors(write_cfg, overrides, expected):
    assert expected in error_of(write_cfg(), *overrides)


def test_the_same_config_runs_on_any_world_size(write_cfg):
    cfg = load_config(write_cfg(), ["train.strategy=fsdp", "launch.backend=torchrun",
                                    "launch.nproc_per_node=4", "train.deepspeed.zero_stage=3",
                                    "train.global_batch_size=32"])
    assert cfg.launch.nproc_per_node == 4 and cfg.train.global_batch_size == 32



def test_yaml_anchors_that_do_not_explode_still_work(write_cfg, model_dir, data_file):
    text = (f"name: demo\nmodel: {{name_or_path: {q(model_dir)}}}\n"
            f"data:\n  train: &files [{q(data_file)}]\n  eval: *files\n"
            "train:\n  lr: 1.0e-3\n  micro_batch_size: oops\n")
    path = write_cfg(text=text)
    assert error_of(path).startswith(f"{path}:8: train.micro_batch_size:")  # lines still found
    cfg = load_config(path, ["train.micro_batch_size=2"])
    assert cfg.data.eval == cfg.data.train == [str(data_file)]
