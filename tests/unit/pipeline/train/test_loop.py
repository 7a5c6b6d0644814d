"""Trimming the metrics and ledger files on resume: a torn or NUL-filled tail (a kill or a full disk
mid-append) is dropped with a warning instead of blocking every resume, and the rewrite is atomic."""

from __future__ import annotations

import json

from pipeline.train.loop import truncate_log


def test_a_torn_or_nul_filled_tail_is_dropped_and_the_rewrite_is_atomic(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    log.write_bytes(("\n".join(lines) + "\n").encode() + b'{"step": 6, "lo' + b"\0" * 4096)
    before = log.stat().st_ino
    truncate_log(log, 3)
    assert log.read_text().splitlines() == lines[:3]
    assert log.stat().st_ino != before  # a new file renamed over the old: never half rewritten
    truncate_log(log, 3)
    assert log.read_text().splitlines() == lines[:3]


def test_a_nul_filled_line_between_records_is_dropped(tmp_path):
    log = tmp_path / "rank-0.jsonl"
    log.write_bytes(b'{"step": 1}\n' + b"\0" * 100 + b'\n{"step": 2}\n')
    truncate_log(log, 5)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
