"""The completion base of unit-wise stages on a made-up stage: markers last, pending units, stale
outputs, merged rejects, the reject-fraction check, and the same task in a process pool."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import units
from pipeline.config import validate_config
from pipeline.errors import UserError
from pipeline.parallel import run_tasks
from pipeline.run_dir import RunDir
from tests import fixtures


@dataclass(frozen=True)
class Line:
    """Unit i copies line i of `<run>/input.txt` to `<run>/out/NNNNN.txt`; "bad" lines are rejected."""

    index: int
    folder: Path
    text: str
    fingerprint: str
    marker: Path
    rejects: Path

    @property
    def outputs(self) -> list[Path]:
        return [self.folder / f"{self.index:05d}.txt", self.rejects]


class Lines:
    name = "lines"

    def task_count(self, cfg, run_dir: RunDir) -> int:
        return 3

    def ready(self, cfg, run_dir: RunDir) -> bool:
        return (run_dir.root / "input.txt").exists()

    def units(self, cfg, run_dir: RunDir) -> list[Line]:
        texts, out = (run_dir.root / "input.txt").read_text().splitlines(), run_dir.root / "out"
        return [Line(i, out, t, f"fp-{t}", out / f"{i:05d}.json", out / f"{i:05d}.rejects.jsonl")
                for i, t in enumerate(texts)]

    def work(self, cfg, run_dir: RunDir, unit: Line) -> dict[str, Any]:
        unit.folder.mkdir(parents=True, exist_ok=True)
        if unit.text == "boom":
            (unit.folder / f"{unit.index:05d}.txt").write_text("half")
            raise RuntimeError("boom")
        bad = unit.text.startswith("bad")
        unit.rejects.write_text(json.dumps({"unit": unit.index}) + "\n" if bad else "")
        (unit.folder / f"{unit.index:05d}.txt").write_text(unit.text)
        return {"rows": 0 if bad else 1, "rejected": int(bad)}


LINES = Lines()


@pytest.fixture
def cfg(tmp_path, tiny_llama):
    data = fixtures.write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    return validate_config(fixtures.causal_config(tmp_path, tiny_llama, data))


def _write(run_dir: Path, *lines: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "input.txt").write_text("".join(f"{line}\n" for line in lines))


def test_a_unit_whose_work_fails_leaves_no_marker_and_stays_pending(tmp_path, cfg):
    run = RunDir(tmp_path / "run")
    _write(run.root, "a", "boom", "c")
    with pytest.raises(RuntimeError):
        units.run_units(LINES, cfg, run, workers=1)
    assert (run.root / "out" / "00000.json").exists() and not (run.root / "out" / "00001.json").exists()
    assert units.pending(LINES, cfg, run) == [1, 2]  # 2 never ran: the pool stopped at the failure


def test_pending_skips_current_markers_and_redoes_changed_ones(tmp_path, cfg):
    run = RunDir(tmp_path / "run")
    assert units.pending(LINES, cfg, run) == [0, 1, 2]  # not ready: every rank
    _write(run.root, "a", "b", "c")
    done = units.run_units(LINES, cfg, run, workers=1)
    assert done.ran == 3 and [r["fingerprint"] for r in done.records] == ["fp-a", "fp-b", "fp-c"]
    assert units.pending(LINES, cfg, run) == []
    before = (run.root / "out" / "00000.json").stat().st_mtime_ns
    _write(run.root, "a", "B", "c")
    assert units.pending(LINES, cfg, run) == [1]
    again = units.run_units(LINES, cfg, run, workers=1)
    assert again.ran == 1 and (run.root / "out" / "00001.txt").read_text() == "B"
    assert (run.root / "out" / "00000.json").stat().st_mtime_ns == before


def test_outputs_of_units_that_no_longer_exist_and_temporaries_go(tmp_path, cfg):
    run = RunDir(tmp_path / "run")
    _write(run.root, "a", "b", "c")
    units.run_units(LINES, cfg, run, workers=1)
    (run.root / "out" / ".00000.txt.tmp-dead").write_text("left by a killed task")
    _write(run.root, "a")
    units.run_units(LINES, cfg, run, workers=1)
    assert sorted(p.name for p in (run.root / "out").iterdir()) == ["00000.json", "00000.rejects.jsonl",
                                                               "00000.txt"]


def test_rejects_merge_in_unit_order(tmp_path, cfg):
    run = RunDir(tmp_path / "run")
    _write(run.root, "bad1", "ok", "bad2")
    done = units.run_units(LINES, cfg, run, workers=1)
    rows = units.merge_rejects(done.units, run.root / "rejects.jsonl")
    lines = (run.root / "rejects.jsonl").read_text().splitlines()
    assert rows == 2 and [json.loads(line)["unit"] for line in lines] == [0, 2]


def test_one_reject_fraction_check(cfg):
    limit = cfg.data.max_reject_fraction
    files = [Path("here.jsonl"), Path("upstream.jsonl")]
    units.check_rejects(cfg, 10, 100, [int(limit * 50), int(limit * 50)], files, "none")
    with pytest.raises(UserError, match=r"no rows left \(3 rejected, see here.jsonl\)"):
        units.check_rejects(cfg, 0, 100, [3, 0], files, "no rows left")
    with pytest.raises(UserError,
                       match=r"data: 100 of 100 rows rejected .*see here.jsonl and upstream.jsonl"):
        units.check_rejects(cfg, 1, 100, [60, 40], files, "none")


def test_worker_processes_run_the_same_task(tmp_path, cfg):
    run = RunDir(tmp_path / "run")
    _write(run.root, "a", "b", "c")
    done = list(run_tasks(units.task(LINES), cfg, run, [0, 2], 3, workers=2))
    assert sorted(d.result["fingerprint"] for d in done) == ["fp-a", "fp-c"]
    assert units.pending(LINES, cfg, run) == [1]


def test_reject_limit_names_the_commonest_reasons_with_counts(tmp_path, cfg):
    here, upstream = tmp_path / "here.jsonl", tmp_path / "upstream.jsonl"
    reasons = ["malformed JSON: Expecting value at column 5", "missing field 'text'",
               "malformed JSON: Expecting value at column 12", "unknown label 7 (expected one of 0..1)"]
    here.write_text("".join(json.dumps({"reason": r, "line": n}) + "\n" for n, r in enumerate(reasons)))
    upstream.write_text(json.dumps({"reason": "missing field 'text'"}) + "\n{torn\n"
                        + json.dumps({"reason": "malformed JSON: Expecting value at column 1"}) + "\n")
    with pytest.raises(UserError) as info:
        units.check_rejects(cfg, 1, 10, [4, 3], [here, upstream], "none")
    assert str(info.value) == (
        "data: 7 of 10 rows rejected (70.0% > data.max_reject_fraction 1.0%), most often: malformed JSON: "
        "Expecting value at column N (3), missing field 'text' (2), unknown label N (1) and 1 more; "
        f"see {here} and {upstream}")


@pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite"])
def test_a_unit_whose_output_changed_under_its_marker_is_pending_and_named(tmp_path, cfg, damage):
    run = RunDir(tmp_path / "run")
    _write(run.root, "a", "bbbb", "c")
    units.run_units(LINES, cfg, run, workers=1)
    output = run.root / "out" / "00001.txt"
    if damage == "truncate":
        output.write_text("bb")
    elif damage == "delete":
        output.unlink()
    else:  # same size, other bytes: only the checksum tells
        output.write_text("BBBB")
    assert units.pending(LINES, cfg, run) == [1]
    assert str(output) in units.first_problem(LINES, cfg, run)
    again = units.run_units(LINES, cfg, run, workers=1)
    assert again.ran == 1 and output.read_text() == "bbbb"
    assert units.first_problem(LINES, cfg, run) is None


def test_markers_record_each_output_size_and_checksum(tmp_path, cfg):
    run = RunDir(tmp_path / "run")
    _write(run.root, "abc")
    units.run_units(LINES, cfg, run, workers=1)
    record = json.loads((run.root / "out" / "00000.json").read_text())
    assert record["outputs"] == {"00000.txt": {"bytes": 3, "crc32": zlib.crc32(b"abc")},
                                 "00000.rejects.jsonl": {"bytes": 0, "crc32": 0}}
