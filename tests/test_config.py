"""The run config: loading, dotted overrides, and one-line errors that name the file, line and key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from pipeline.config import load_config
from pipeline.sources import check_paths
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Line numbers below refer to this template; edits keep the line count so they stay valid.
BASE = """\
name: demo
output_dir: {out}
model:
  name_or_path: {model}
  task: causal_lm
data:
  train: [{train}]
  eval_fraction: 0.2
  num_shards: 2
train:
  lr: 1.0e-3
  micro_batch_size: 4
  precision: fp32
tracking:
  enabled: false
"""
LINE = {"name": 1, "model": 3, "model.task": 5, "data": 6, "data.train": 7, "data.eval_fraction": 8,
        "data.num_shards": 9, "train": 10, "train.lr": 11, "train.micro_batch_size": 12,
        "train.precision": 13, "tracking": 14}


def q(path: Path | str) -> str:
    return json.dumps(str(path))  # a JSON string is a valid YAML scalar, whatever the path holds


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n')
    return path


@pytest.fixture
def write_cfg(tmp_path, model_dir, data_file):
    """write_cfg(replace={old_line: new_line}) -> path of a config made from BASE."""

    def write(replace: dict[str, str] | None = None, text: str | None = None, name: str = "cfg.yaml") -> Path:
        body = text if text is not None else BASE.format(out=q(tmp_path / "runs"), model=q(model_dir),
                                                         train=q(data_file))
        for old, new in (replace or {}).items():
            assert old in body, old
            body = body.replace(old, new)
        assert text is not None or body.count("\n") == BASE.count("\n")
        path = tmp_path / name
        path.write_text(body)
        return path

    return write


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


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
        "train.seed=7", "train.epochs=2.5", "evaluate.batch_size=4", "name=second-run", "data.eval_fraction=0"])
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
    assert error_of(path, "evalute.batch_size=3") == f"{path}: unknown key 'evalute' (did you mean 'evaluate'?)"


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
    ("  train: [", "  train: []  #", "{path}:7: data.train: List should have at least 1 item after validation, "
     "not 0 (got [])"),
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


def test_several_errors_report_the_first_and_a_count(write_cfg):
    path = write_cfg({"  lr: 1.0e-3": "  lr: -1", "  precision: fp32": "  precision: fp16"})
    assert error_of(path) == f"{path}:11: train.lr: Input should be greater than 0 (got -1) (and 1 more)"


@pytest.mark.parametrize("overrides, expected", [
    ([], "{path}: sequence_classification needs model.num_labels or data.labels"),
    (["model.num_labels=3", "data.labels=[neg,pos]"], "{path}: model.num_labels is 3 but data.labels has 2 names"),
    (["data.labels=[neg,neg]"], "{path}: data.labels has duplicate names"),
    (["model.num_labels=1"], "{path}: model.num_labels: Input should be greater than or equal to 2 (got 1)"),
], ids=["no-labels", "count-mismatch", "duplicates", "one-label"])
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
        f"{path}: evaluate.compare_base: Input should be a valid boolean, unable to interpret input (got 'maybe')")


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


# --- paths ---------------------------------------------------------------------------------------


def paths_error(path: Path, *overrides: str) -> str:
    cfg = load_config(path, list(overrides))
    with pytest.raises(UserError) as info:
        check_paths(cfg)
    return str(info.value)


def test_missing_data_files_name_the_list_item(write_cfg, tmp_path, data_file):
    path = write_cfg()
    assert paths_error(path, "data.train=[nope/*.jsonl]") == "data.train[0]: no file matches 'nope/*.jsonl'"
    second = f"data.train=[{data_file},{tmp_path}/missing.jsonl]"
    assert paths_error(path, second) == f"data.train[1]: no file matches '{tmp_path}/missing.jsonl'"
    assert paths_error(path, "data.eval=[gone.parquet]") == "data.eval[0]: no file matches 'gone.parquet'"


def test_glob_matching_only_a_directory_is_missing(write_cfg, tmp_path):
    (tmp_path / "only_dirs" / "x.jsonl").mkdir(parents=True)
    pattern = f"{tmp_path}/only_dirs/*.jsonl"
    assert paths_error(write_cfg(), f"data.train=[{pattern}]") == f"data.train[0]: no file matches '{pattern}'"


def test_missing_model_dir(write_cfg, tmp_path):
    missing = tmp_path / "no-such-model"
    assert paths_error(write_cfg(), f"model.name_or_path={missing}") == (
        f"model.name_or_path: '{missing}' is neither a local directory nor a hub id")


def test_model_dir_without_config_json(write_cfg, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert paths_error(write_cfg(), f"model.name_or_path={empty}") == (
        f"model.name_or_path: '{empty}' has no config.json")


def test_hub_id_is_accepted_without_a_local_directory(write_cfg):
    cfg = load_config(write_cfg(), ["model.name_or_path=HuggingFaceTB/SmolLM2-135M"])
    check_paths(cfg)


# --- through the CLI -----------------------------------------------------------------------------


def _cli_cases(tmp_path: Path, data_file: Path) -> dict[str, tuple[dict, list[str], str]]:
    """name -> (replacements in BASE, overrides, expected message after 'ftpipe: error: ')."""
    return {
        "misspelled": ({"  eval_fraction: 0.2": "  eval_fration: 0.2"}, [],
                       "{path}:8: unknown key 'data.eval_fration' (did you mean 'data.eval_fraction'?)"),
        "misspelled-section": ({"tracking:": "trackng:"}, [],
                               "{path}:14: unknown key 'trackng' (did you mean 'tracking'?)"),
        "unknown-override": ({}, ["train.lrr=3"], "{path}: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        "negative-lr": ({"  lr: 1.0e-3": "  lr: -1"}, [], "{path}:11: train.lr: Input should be greater than 0 (got -1)"),
        "eval-fraction": ({"  eval_fraction: 0.2": "  eval_fraction: 1"}, [],
                          "{path}:8: data.eval_fraction: Input should be less than 1 (got 1)"),
        "num-shards": ({"  num_shards: 2": "  num_shards: 0"}, [],
                       "{path}:9: data.num_shards: Input should be greater than or equal to 1 (got 0)"),
        "batch-eight": ({"  micro_batch_size: 4": "  micro_batch_size: eight"}, [],
                        "{path}:12: train.micro_batch_size: Input should be a valid integer, unable to parse string "
                        "as an integer (got 'eight')"),
        "fp16": ({"  precision: fp32": "  precision: fp16"}, [],
                 "{path}:13: train.precision: Input should be 'fp32' or 'bf16' (got 'fp16')"),
        "bad-override-value": ({}, ["evaluate.batch_size=eight"],
                               "{path}: evaluate.batch_size: Input should be a valid integer, unable to parse string "
                               "as an integer (got 'eight')"),
        "task-format": ({"  num_shards: 2": "  format: classification"}, [],
                        "{path}: model.task 'causal_lm' needs data.format 'text', got 'classification'"),
        "no-labels": ({"  task: causal_lm": "  task: sequence_classification",
                       "  num_shards: 2": "  format: classification"}, [],
                      "{path}: sequence_classification needs model.num_labels or data.labels"),
        "label-count": ({"  task: causal_lm": "  task: sequence_classification",
                         "  num_shards: 2": "  format: classification"}, ["model.num_labels=3", "data.labels=[a,b]"],
                        "{path}: model.num_labels is 3 but data.labels has 2 names"),
        "invalid-yaml": ({"  micro_batch_size: 4": "  micro_batch_size: [4"}, [],
                         "{path}:13: invalid YAML: expected ',' or ']', but got ':'"),
        "malformed-override": ({}, ["train.lr"], "override 'train.lr': expected KEY.SUB=VALUE, e.g. train.lr=1e-4"),
        "missing-data": ({}, ["data.train=[nope/*.jsonl]"], "data.train[0]: no file matches 'nope/*.jsonl'"),
        "missing-model": ({}, [f"model.name_or_path={tmp_path}/absent"],
                          f"model.name_or_path: '{tmp_path}/absent' is neither a local directory nor a hub id"),
        "model-no-config-json": ({}, [f"model.name_or_path={data_file.parent}"],
                                 f"model.name_or_path: '{data_file.parent}' has no config.json"),
    }


CLI_CASES = list(_cli_cases(Path("/x"), Path("/x/d.jsonl")))


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_bad_config_exits_2_with_one_line(write_cfg, tmp_path, data_file, capsys, case, command):
    replace, overrides, expected = _cli_cases(tmp_path, data_file)[case]
    path = write_cfg(replace)
    rc = main([command, str(path), *overrides, *(["--no-progress"] if command == "run" else [])])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err == f"ftpipe: error: {expected.format(path=path)}\n"
    assert out == ""
    assert not (tmp_path / "runs" / "demo").exists()


@pytest.mark.parametrize("kind", ["missing-file", "not-a-mapping"])
def test_cli_unreadable_config_exits_2(tmp_path, capsys, kind):
    path = tmp_path / "cfg.yaml"
    if kind == "not-a-mapping":
        path.write_text("[1, 2]\n")
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"ftpipe: error: {path}: ")


def test_cli_validate_good_config_prints_plan_and_creates_no_run_dir(write_cfg, tmp_path, capsys):
    path = write_cfg()
    rc = main(["validate", str(path), "train.lr=1e-4"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    run_dir = tmp_path / "runs" / "demo"
    lines = out.splitlines()
    assert lines[0] == f"{path}: config is valid"
    assert lines[1] == f"run directory: {run_dir}"
    stages = ["shard", "tokenize", "train", "consolidate", "evaluate"]
    assert len(lines) == 2 + len(stages)
    for line, stage in zip(lines[2:], stages):
        assert line.split() == [stage, "run", "not", "done", "yet", "->", str(run_dir / stage)]
    assert not run_dir.exists()


def test_cli_plan_is_validate(write_cfg, capsys):
    path = write_cfg()
    assert main(["plan", str(path)]) == 0
    plan_out = capsys.readouterr().out
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == plan_out


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_subprocess_misspelled_key_exits_2_without_traceback(write_cfg):
    path = write_cfg({"  eval_fraction: 0.2": "  eval_fration: 0.2"})
    proc = _subprocess("validate", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"ftpipe: error: {path}:8: unknown key 'data.eval_fration' (did you mean 'data.eval_fraction'?)\n")
    assert proc.stdout == ""


def test_subprocess_missing_data_exits_2_without_traceback(write_cfg):
    proc = _subprocess("run", str(write_cfg()), "data.train=[nope/*.jsonl]", "--no-progress")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr == "ftpipe: error: data.train[0]: no file matches 'nope/*.jsonl'\n"


# --- distributed launch and strategy keys -------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["launch.nproc_per_node=2"], "ask for 2 ranks; set launch.backend: torchrun"),
    (["launch.backend=torchrun", "launch.nproc_per_node=2"], "train.strategy 'single' cannot use 2 ranks"),
    (["launch.backend=torchrun", "train.strategy=ddp", "launch.nnodes=2"], "needs launch.rdzv_endpoint"),
    (["train.strategy=deepspeed", "train.deepspeed.offload_params=cpu"], "offload_params: cpu needs zero_stage: 3"),
    (["train.deepspeed.config=ds_configs/zero3.json"], "train.strategy is not 'deepspeed'"),
    (["train.strategy=zero3"], "train.strategy: Input should be 'single', 'ddp', 'deepspeed' or 'fsdp'"),
    (["train.fsdp.reshard=false"], "unknown key 'train.fsdp.reshard' (did you mean 'train.fsdp.reshard_after_forward'?)"),
    (["model.lora.rank=4"], "unknown key 'model.lora.rank'"),
])
def test_distributed_settings_are_checked_with_one_line_errors(write_cfg, overrides, expected):
    assert expected in error_of(write_cfg(), *overrides)


def test_the_same_config_runs_on_any_world_size(write_cfg):
    cfg = load_config(write_cfg(), ["train.strategy=fsdp", "launch.backend=torchrun", "launch.nproc_per_node=4",
                                    "train.deepspeed.zero_stage=3", "train.global_batch_size=32"])
    assert cfg.launch.nproc_per_node == 4 and cfg.train.global_batch_size == 32
