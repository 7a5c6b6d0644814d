"""The bad-input corpus (tests/bad_inputs/cases.yaml): each case is a config, data file, model folder
or run directory a user could give ftpipe. Every one must end in exit code 2 with exactly one line on
stderr, "ftpipe: error: ..." naming the file, line or key (the case's `expect`), no traceback, and
every file that was there before (inputs, the shared model, a previous run) unchanged. The CLI runs
in this process; cases stop at `validate` or in the shard stage, so the corpus stays cheap."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from tests import fixtures
from tests.helpers import ftpipe

CORPUS = Path(__file__).resolve().parents[1] / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
# Big enough that a batch's floor estimate (logits + one activation per layer) is meaningful.
MODEL_CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32}


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory) -> Path:
    return fixtures.fake_model_dir(tmp_path_factory.mktemp("corpus") / "model", MODEL_CONFIG)


def pieces(spec: str | list) -> str:
    """Text from a list of pieces, each text or [text, times] (big inputs stay small in the index)."""
    if isinstance(spec, str):
        return spec
    return "".join(p if isinstance(p, str) else p[0] * p[1] for p in spec)


def fill(text: str, work: Path, model: Path) -> str:
    return text.replace("{work}", str(work)).replace("{model}", str(model))


def prepare(case: dict, work: Path, model: Path) -> list[str]:
    """The case's folder: the good data file, a previous run, its config and files; returns argv."""
    (work / "data").mkdir(parents=True)
    shutil.copy(CORPUS / "data" / "good.jsonl", work / "data" / "train.jsonl")
    shutil.copytree(CORPUS / "runs" / "previous", work / "old")
    if case.get("config", "base.yaml") != "none":
        text = (CORPUS / "configs" / case.get("config", "base.yaml")).read_text()
        for old, new in case.get("replace", {}).items():
            assert old in text, (case["id"], old)
            text = text.replace(old, pieces(new))
        (work / "cfg.yaml").write_text(fill(text, work, model))
    for target, source in case.get("files", {}).items():
        copy = shutil.copytree if (CORPUS / source).is_dir() else shutil.copy
        (work / target).parent.mkdir(parents=True, exist_ok=True)
        copy(CORPUS / source, work / target)
    for target, spec in case.get("write", {}).items():
        (work / target).parent.mkdir(parents=True, exist_ok=True)
        (work / target).write_bytes(pieces(spec).encode("utf-8", "surrogateescape"))
    args = [fill(str(a), work, model) for a in case.get("args", [])]
    command = case.get("command", "validate")
    if command in ("status", "logs"):
        return [command, *args]
    stages = [] if command != "run" or "--stages" in args else ["--stages", "shard", "--no-progress"]
    return [command, str(work / "cfg.yaml"), *args, *stages]


def snapshot(*folders: Path) -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, shared_model, capsys, monkeypatch):
    work = tmp_path / "work"
    argv = prepare(case, work, shared_model)
    monkeypatch.chdir(work)  # relative paths in the cases are relative to the case's folder
    monkeypatch.setenv("FTPIPE_DEBUG", "0")
    before = snapshot(work, shared_model)
    capsys.readouterr()

    code = ftpipe(*argv)

    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftpipe: error: "), err
    assert fill(case["expect"], work, shared_model) in lines[0]
    assert code == 2
    after = snapshot(work, shared_model)
    assert {path: after.get(path) for path in before} == before, "a file written before changed"


def test_corpus_covers_every_kind_of_input():
    assert len(CASES) >= 40
    models = [c for c in CASES if "name_or_path" in " ".join(map(str, c.get("args", [])))]
    rows = [c for c in CASES if c.get("command") == "run" and "--stages" not in c.get("args", [])]
    dirs = [c for c in CASES if "output_dir" in str(c) or c.get("command") in ("status", "logs")]
    assert min(len(models), len(rows), len(dirs)) >= 5


def test_debug_shows_the_traceback_then_the_line(tmp_path, shared_model, capsys, monkeypatch):
    case = next(c for c in CASES if c["id"] == "model-without-weights")
    work = tmp_path / "work"
    argv = prepare(case, work, shared_model)
    monkeypatch.chdir(work)
    monkeypatch.setenv("FTPIPE_DEBUG", "0")  # --debug sets it to 1; monkeypatch restores it after the test
    capsys.readouterr()
    assert ftpipe("--debug", *argv) == 2
    first = capsys.readouterr().err
    assert first.startswith("Traceback (most recent call last):")
    assert first.splitlines()[-1].startswith("ftpipe: error: model.name_or_path: ")
    assert "raise UserError" in first
    monkeypatch.setenv("FTPIPE_DEBUG", "0")
    assert ftpipe(*argv, "--debug") == 2  # after the subcommand too
    assert capsys.readouterr().err == first
