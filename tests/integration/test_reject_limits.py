"""data.max_reject_fraction and sources without one valid row: one-line errors before any
training, from the stage, the CLI (exit 2) and a fresh interpreter (no traceback)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.cli import main
from pipeline.errors import UserError
from tests import fixtures
from tests.helpers import REPO, ftpipe_process
from tests.shard_checks import J, data_dir, make_cfg, make_raw, rejects_of, run_shard, shard_rows


def _mostly_good(path: Path, good: int, bad_lines: dict[int, bytes]) -> Path:
    """`good` valid rows with the given bad lines (1-based positions) among them."""
    lines: list[bytes] = []
    rows = iter(range(good))
    while len(lines) < good + len(bad_lines):
        position = len(lines) + 1
        lines.append(bad_lines[position] if position in bad_lines else J({"text": f"good row {next(rows)}"}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD = {3: b"{broken", 20: J({"text": ""}), 47: J([1]), 80: b"\xff", 105: J({"txt": "x"})}
# The limit's message names the commonest reasons (here all once: the first three in file order).
BAD_REASONS = (", most often: malformed JSON: Expecting property name enclosed in double quotes at column N "
               "(1), empty text in field 'text' (1), expected a JSON object, got list (1) and 2 more")


def test_too_many_rejects_stop_the_run_and_keep_rejects(tmp_path, model_dir):
    source = _mostly_good(tmp_path / "d.jsonl", 100, BAD)
    cfg = make_cfg(tmp_path, model_dir, [source])  # default max_reject_fraction: 0.01
    assert cfg.data.max_reject_fraction == 0.01
    with pytest.raises(UserError) as info:
        run_shard(cfg)
    where = data_dir(cfg) / "rejects.jsonl"
    assert str(info.value) == (f"data: 5 of 105 rows rejected (4.8% > data.max_reject_fraction 1.0%)"
                               f"{BAD_REASONS}; see {where}")
    assert [(r["file"], r["line"]) for r in rejects_of(cfg)] == [(str(source), n) for n in sorted(BAD)]


def test_reject_fraction_at_the_limit_passes(tmp_path, model_dir):
    source = _mostly_good(tmp_path / "d.jsonl", 99, {50: b"{broken"})
    cfg = make_cfg(tmp_path, model_dir, [source], max_reject_fraction=0.01)
    manifest = run_shard(cfg)
    assert manifest["rejected"] == 1
    assert sum(len(rows) for rows in shard_rows(cfg).values()) == 99


def test_raised_reject_limit_lets_the_run_continue(tmp_path, model_dir):
    source = _mostly_good(tmp_path / "d.jsonl", 100, BAD)
    cfg = make_cfg(tmp_path, model_dir, [source], max_reject_fraction=0.05)
    assert run_shard(cfg)["rejected"] == 5


# kind -> (file name, its content: bytes, or the text column of a parquet file, rows it rejects)
NO_VALID_ROWS: dict[str, tuple[str, bytes | list, int]] = {
    "jsonl-all-bad": ("bad.jsonl", b'{"text": ""}\n[1]\n\n\xff\xfe\n', 3),
    "jsonl-empty": ("empty.jsonl", b"", 0),
    "txt-blank-lines": ("blank.txt", b"\n  \n\t\n", 0),
    "csv-header-only": ("header.csv", b"text,label\n", 0),
    "csv-all-bad": ("bad.csv", b"text\n,\n\xff\n", 2),
    "parquet-empty": ("empty.parquet", [], 0),
    "parquet-all-null": ("null.parquet", [None, None, ""], 3),
}
EMPTY_KINDS = list(NO_VALID_ROWS)
NO_VALID_REASONS = {
    "jsonl-all-bad": ("empty text in field 'text' (1), expected a JSON object, got list (1), "
                      "invalid UTF-8 at byte N (1)"),
    "csv-all-bad": "more fields than the header (1), invalid UTF-8 (1)",
    "parquet-all-null": "missing field 'text' (2), empty text in field 'text' (1)",
}


def _write_all_bad(folder: Path, kind: str) -> tuple[Path, int]:
    name, content, rejected = NO_VALID_ROWS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        pq.write_table(pa.table({"text": pa.array(content, pa.string())}), path)
    return path, rejected


@pytest.mark.parametrize("kind", EMPTY_KINDS)
def test_no_valid_rows_is_an_error(tmp_path, model_dir, kind):
    source, bad = _write_all_bad(tmp_path / "src", kind)
    cfg = make_cfg(tmp_path, model_dir, [source], max_reject_fraction=1.0)
    with pytest.raises(UserError) as info:
        run_shard(cfg)
    where = data_dir(cfg) / "rejects.jsonl"
    reasons = f", most often: {NO_VALID_REASONS[kind]}" if bad else ""
    assert str(info.value) == f"data.train: no valid training rows ({bad} rejected{reasons}, see {where})"
    assert len(rejects_of(cfg)) == bad


def test_text_file_for_classification_rejects_every_line(tmp_path, model_dir):
    source = tmp_path / "lines.txt"
    source.write_text("one line\ntwo line\n")
    cfg = make_cfg(tmp_path, model_dir, [source], classify=True)
    with pytest.raises(UserError) as info:
        run_shard(cfg)
    assert "no valid training rows (2 rejected" in str(info.value)
    assert [(r["line"], r["reason"]) for r in rejects_of(cfg)] == [(1, "missing field 'label'"),
                                                                  (2, "missing field 'label'")]


# --- through the CLI ----------------------------------------------------------------------------------


def _cli_config(tmp_path: Path, model_dir: Path, source: Path, **data) -> Path:
    raw = make_raw(tmp_path, model_dir, [source], **data)
    return fixtures.write_config(tmp_path / "cfg.yaml", raw)


def test_cli_too_many_rejects_exits_2_with_one_line(tmp_path, model_dir, capsys):
    source = _mostly_good(tmp_path / "d.jsonl", 100, BAD)
    config = _cli_config(tmp_path, model_dir, source)
    rc = main(["run", str(config), "--stages", "shard", "--no-progress"])
    out, err = capsys.readouterr()
    where = tmp_path / "runs" / "lm" / "shard" / "data" / "rejects.jsonl"
    assert rc == 2
    assert err == (f"ftpipe: error: data: 5 of 105 rows rejected (4.8% > data.max_reject_fraction 1.0%)"
                   f"{BAD_REASONS}; see {where}\n")
    assert "  shard       run" in out
    assert len(where.read_text().splitlines()) == 5
    assert not (tmp_path / "runs" / "lm" / "shard" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["jsonl-all-bad", "parquet-empty"])
def test_cli_no_valid_rows_exits_2_with_one_line(tmp_path, model_dir, capsys, kind):
    source, bad = _write_all_bad(tmp_path / "src", kind)
    config = _cli_config(tmp_path, model_dir, source)
    rc = main(["run", str(config), "--stages", "shard", "--no-progress"])
    err = capsys.readouterr().err
    where = tmp_path / "runs" / "lm" / "shard" / "data" / "rejects.jsonl"
    assert rc == 2
    reasons = f", most often: {NO_VALID_REASONS[kind]}" if bad else ""
    assert err == (f"ftpipe: error: data.train: no valid training rows ({bad} rejected{reasons}, "
                   f"see {where})\n")


def test_subprocess_no_valid_rows_exits_2_without_traceback(tmp_path, model_dir):
    source, _ = _write_all_bad(tmp_path / "src", "jsonl-all-bad")
    config = _cli_config(tmp_path, model_dir, source)
    proc = ftpipe_process("run", str(config), "--stages", "shard", "--no-progress", cwd=REPO)
    where = tmp_path / "runs" / "lm" / "shard" / "data" / "rejects.jsonl"
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    reasons = NO_VALID_REASONS["jsonl-all-bad"]
    assert proc.stderr == (f"ftpipe: error: data.train: no valid training rows (3 rejected, most often: "
                           f"{reasons}, see {where})\n")
