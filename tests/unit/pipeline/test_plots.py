"""The pictures a full run does not draw in tests/integration/test_report.py: packing efficiency and a
sweep's comparison, from the files their stages write (written here as the stages write them)."""

import json

import pytest
from matplotlib.image import imread

from pipeline import plots
from pipeline.run_dir import RunDir


def _member(root, name: str, losses: list[float], final: float) -> tuple[str, RunDir]:
    run = RunDir(root / name)
    run.stage("train").mkdir(parents=True)
    run.stage("evaluate").mkdir(parents=True)
    (run.stage("train") / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": loss}) + "\n" for i, loss in enumerate(losses)))
    run.metrics_file.write_text(json.dumps({"loss": final}))
    return name, run


def _drawn(path) -> None:
    image = imread(path)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.01  # decodes, and is not blank


def test_a_sweep_compares_its_members_curves_and_final_metrics(tmp_path):
    members = [_member(tmp_path, "lr1", [3.0, 2.5, 2.0], 2.1), _member(tmp_path, "lr3", [3.0, 2.0, 1.5], 1.7)]
    path = plots.sweep_comparison(members, tmp_path / "sweep")
    _drawn(path)
    assert path.name == "sweep.png"
    assert plots.sweep_comparison([], tmp_path / "none") is None


def test_packing_efficiency_is_drawn_from_the_tokenize_manifest(tmp_path):
    run = RunDir(tmp_path / "run")
    assert plots.packing_efficiency(run, tmp_path / "out") is None  # no tokenize stage yet
    splits = {"train": {"rows": 10, "tokens": 900, "packing_efficiency": 0.9, "examples_per_row": 3.2},
              "eval": {"rows": 2, "tokens": 150, "packing_efficiency": 0.75, "examples_per_row": 2.5}}
    run.write_manifest("tokenize", {"stage": "tokenize", "splits": splits})
    _drawn(plots.packing_efficiency(run, tmp_path / "out"))


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert plots.read_jsonl(path) == [{"step": 1, "loss": pytest.approx(2.0)}]
