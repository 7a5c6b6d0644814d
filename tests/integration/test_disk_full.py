"""A full disk, for real: run directories on a small tmpfs that a filler file fills up mid-run. Each
stage that hits it stops with one line naming the path and the space free and needed, exit 2; what
was finished before is intact, and `ftpipe run` completes once space is freed. A read-only
filesystem is one line as well."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.run_dir import damaged_file
from pipeline.train.checkpoint import damage
from tests import fixtures
from tests.helpers import ftpipe, ftpipe_process, manifest

LEAVE_FREE = 16 << 10  # room for the small files a run rewrites (config, fingerprints), not for data
FILL_AFTER_STEP_2 = """
import os
from pathlib import Path
import pipeline.train.loop as loop
from tests.integration.test_disk_full import fill
_save = loop.save_checkpoint
def save_then_fill(root, step, *args, **kwargs):
    path = _save(root, step, *args, **kwargs)
    if step == 2:
        fill(Path(os.environ["FILLER"]))
    return path
loop.save_checkpoint = save_then_fill
"""


def fill(filler: Path, leave: int = LEAVE_FREE) -> None:
    """Take all but `leave` bytes of the free space of filler's filesystem."""
    stats = os.statvfs(filler.parent)
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(1, stats.f_bavail * stats.f_frsize - leave))


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=64m")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ftpipe: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_disk_full_while_tokenizing(small_disk, tmp_path, tiny_llama):
    data = fixtures.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in fixtures.sentences(6000)])
    cfg = fixtures.causal_config(small_disk, tiny_llama, data)
    config = fixtures.write_config(tmp_path / "c.yaml", cfg)
    data_stages = ("--stages", "shard,tokenize", "--no-progress")
    assert ftpipe("run", config, *data_stages) == 0
    out = small_disk / "runs" / "lm" / "tokenize"
    redo = out / "train" / "00001.arrow"
    redo.unlink()  # this unit must be redone; the disk is then too full for it
    fill(small_disk / "filler")
    failed = ftpipe_process("run", config, *data_stages)
    assert failed.returncode == 2
    line = _one_error_line(failed.stderr)
    assert line.startswith(f"ftpipe: error: {redo}: no space left on device (") and " needed)" in line
    for marker in sorted(set(out.glob("*/[0-9]*.json")) - {out / "train" / "00001.json"}):
        outputs = json.loads(marker.read_text())["outputs"]
        assert damaged_file(outputs, marker.parent, marker) is None, marker  # finished units intact
    (small_disk / "filler").unlink()
    assert ftpipe("run", config, *data_stages) == 0
    assert manifest(small_disk / "runs" / "lm", "tokenize")["ran_shards"] == 1


def test_disk_full_while_checkpointing_and_consolidating(small_disk, tmp_path, tiny_bert, labelled_data):
    config = fixtures.write_config(tmp_path / "c.yaml", fixtures.classification_config(
        small_disk, tiny_bert, labelled_data, train={"max_steps": 6, "checkpoint_every": 2}))
    run, filler = small_disk / "runs" / "cls", small_disk / "filler"
    checkpoints = run / "train" / "checkpoints"
    failed = ftpipe_process("run", config, "--no-progress", script=FILL_AFTER_STEP_2,
                            env={"FILLER": str(filler)})
    assert failed.returncode == 2, failed.stderr
    line = _one_error_line(failed.stderr)
    partial = checkpoints / ".step-000004.partial-"  # and the save's own token
    assert line.startswith(f"ftpipe: error: {partial}") and ": no space left on device (" in line
    assert " needed)" in line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # no partial left
    assert damage(checkpoints / "step-000002") is None
    filler.unlink()
    assert ftpipe("run", config, "--no-progress", "--stages", "shard,tokenize,train") == 0
    assert manifest(run, "train")["resumed_from_step"] == 2

    fill(filler)
    failed = ftpipe_process("run", config, "--no-progress")
    assert failed.returncode == 2, failed.stderr
    line = _one_error_line(failed.stderr)
    assert line.startswith(f"ftpipe: error: {run / 'consolidate' / 'model'}: no space left on device (")
    assert all(damage(folder) is None for folder in checkpoints.iterdir())
    assert not list((run / "consolidate").glob(".model.*"))  # the temporary folder went
    filler.unlink()
    assert ftpipe("run", config, "--no-progress") == 0
    assert manifest(run, "evaluate")


def test_a_read_only_filesystem_is_one_line(tmp_path, tiny_llama, text_data):
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "size=1m,ro")
    try:
        cfg = fixtures.causal_config(disk, tiny_llama, text_data)
        config = fixtures.write_config(tmp_path / "c.yaml", cfg)
        failed = ftpipe_process("run", config, "--no-progress")
        assert failed.returncode == 2
        assert _one_error_line(failed.stderr).startswith(f"ftpipe: error: {disk}/")
        assert "Read-only file system" in failed.stderr
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
