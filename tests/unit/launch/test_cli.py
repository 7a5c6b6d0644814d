"""Config errors as users meet them: missing paths, and `ftpipe validate/run` exiting 2 with one
line on stderr and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.cli import STATUS_ACTIVE, STATUS_DONE, STATUS_FAILED, STATUS_INCOMPLETE, main, status_code
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.preflight import check_inputs
from tests.helpers import REPO, ftpipe_process

# --- paths ---------------------------------------------------------------------------------------


def paths_error(path: Path, *overrides: str) -> str:
    cfg = load_config(path, list(overrides))
    with pytest.raises(UserError) as info:
        check_inputs(cfg)
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
    assert paths_error(write_cfg(), f"data.train=[{pattern}]") == (
        f"data.train[0]: no file matches '{pattern}'")


def test_missing_model_dir(write_cfg, tmp_path):
    missing = tmp_path / "no-such-model"
    assert paths_error(write_cfg(), f"model.name_or_path={missing}") == (
        f"model.name_or_path: no directory '{missing}'")


def test_model_dir_without_config_json(write_cfg, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert paths_error(write_cfg(), f"model.name_or_path={empty}") == (
        f"model.name_or_path: '{empty}' has no config.json")


def test_hub_id_is_accepted_without_a_local_directory(write_cfg):
    cfg = load_config(write_cfg(), ["model.name_or_path=HuggingFaceTB/SmolLM2-135M"])
    check_inputs(cfg)


# --- through the CLI -----------------------------------------------------------------------------


def _cli_cases(tmp_path: Path, data_file: Path) -> dict[str, tuple[dict, list[str], str]]:
    """name -> (replacements in BASE, overrides, expected message after 'ftpipe: error: ')."""
    return {
        "misspelled": ({"  eval_fraction: 0.2": "  eval_fration: 0.2"}, [],
                       "{path}:8: unknown key 'data.eval_fration' (did you mean 'data.eval_fraction'?)"),
        "misspelled-section": ({"tracking:": "trackng:"}, [],
                               "{path}:14: unknown key 'trackng' (did you mean 'tracking'?)"),
        "unknown-override": ({}, ["train.lrr=3"],
                             "{path}: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        "negative-lr": ({"  lr: 1.0e-3": "  lr: -1"}, [],
                        "{path}:11: train.lr: Input should be greater than 0 (got -1)"),
        "eval-fraction": ({"  eval_fraction: 0.2": "  eval_fraction: 1"}, [],
                          "{path}:8: data.eval_fraction: Input should be less than 1 (got 1)"),
        "num-shards": ({"  num_shards: 2": "  num_shards: 0"}, [],
                       "{path}:9: data.num_shards: Input should be greater than or equal to 1 (got 0)"),
        "batch-eight": ({"  micro_batch_size: 4": "  micro_batch_size: eight"}, [],
                        "{path}:12: train.micro_batch_size: Input should be a valid integer, unable to parse "
                        "string as an integer (got 'eight')"),
        "fp16": ({"  precision: fp32": "  precision: fp16"}, [],
                 "{path}:13: train.precision: Input should be 'fp32' or 'bf16' (got 'fp16')"),
        "bad-override-value": ({}, ["evaluate.batch_size=eight"],
                               "{path}: evaluate.batch_size: Input should be a valid integer, unable to "
                               "parse string as an integer (got 'eight')"),
        "task-format": ({"  num_shards: 2": "  format: classification"}, [],
                        "{path}: model.task 'causal_lm' needs data.format 'text', got 'classification'"),
        "label-count": ({"  task: causal_lm": "  task: sequence_classification",
                         "  num_shards: 2": "  format: classification"},
                        ["model.num_labels=3", "data.labels=[a,b]"],
                        "{path}: model.num_labels is 3 but data.labels has 2 names"),
        "invalid-yaml": ({"  micro_batch_size: 4": "  micro_batch_size: [4"}, [],
                         "{path}:13: invalid YAML: expected ',' or ']', but got ':'"),
        "malformed-override": ({}, ["train.lr"],
                               "override 'train.lr': expected KEY.SUB=VALUE, e.g. train.lr=1e-4"),
        "missing-data": ({}, ["data.train=[nope/*.jsonl]"],
                         "data.train[0]: no file matches 'nope/*.jsonl'"),
        "missing-model": ({}, [f"model.name_or_path={tmp_path}/absent"],
                          f"model.name_or_path: no directory '{tmp_path}/absent'"),
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


def test_subprocess_misspelled_key_exits_2_without_traceback(write_cfg):
    path = write_cfg({"  eval_fraction: 0.2": "  eval_fration: 0.2"})
    proc = ftpipe_process("validate", str(path), cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"ftpipe: error: {path}:8: unknown key 'data.eval_fration' (did you mean 'data.eval_fraction'?)\n")
    assert proc.stdout == ""


def test_subprocess_missing_data_exits_2_without_traceback(write_cfg):
    proc = ftpipe_process("run", str(write_cfg()), "data.train=[nope/*.jsonl]", "--no-progress", cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr == "ftpipe: error: data.train[0]: no file matches 'nope/*.jsonl'\n"


@pytest.mark.parametrize("states, code", [
    (["done"] * 5, STATUS_DONE),
    (["done", "done", "running", "queued (Dependency)", "queued (Dependency)"], STATUS_ACTIVE),
    (["done", "done", "pending", "pending", "pending"], STATUS_INCOMPLETE),
    (["done", "done", "stopped (submit again to resume)", "pending", "pending"], STATUS_INCOMPLETE),
    (["done", "running", "done", "failed", "blocked (train did not finish)"], STATUS_FAILED),
    (["done", "timeout", "pending", "pending", "pending"], STATUS_FAILED),
])
def test_status_exit_codes_put_a_failure_first_then_jobs_still_going(states, code):
    assert status_code(states) == code


def test_version(capsys):
    import pipeline

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"ftpipe {pipeline.__version__}"
