"""Checkpoints count only with their marker; pruning keeps the newest."""

import errno
import json
import logging

import pytest
import torch

from pipeline.errors import UserError
from pipeline.train import checkpoint
from tests.unit.pipeline.test_run_dir import FsyncLog


class TinyEngine:
    """A one-layer engine for checkpoint tests (test_unpickling uses it too)."""

    def __init__(self):
        self.model = torch.nn.Linear(2, 2)

    def save(self, folder):
        torch.save(self.model.state_dict(), folder / "engine.pt")

    def load(self, folder):
        self.model.load_state_dict(torch.load(folder / "engine.pt", weights_only=True))

    def describe(self):
        return {"format": "custom"}


def test_a_checkpoint_is_written_under_a_temporary_name_of_its_own(tmp_path):
    """Another writer's partial save of the same step (the fixed name every save used to share) is not
    deleted under it."""
    theirs = tmp_path / ".step-000002.partial"
    theirs.mkdir()
    (theirs / "engine.pt").write_bytes(b"another writer's half")
    checkpoint.save_checkpoint(tmp_path, 2, TinyEngine(), {"step": 2})
    assert (theirs / "engine.pt").read_bytes() == b"another writer's half"
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000002"
    assert list(tmp_path.glob(".step-*")) == [theirs]


def test_checkpoints_count_only_with_marker_and_are_pruned(tmp_path):
    engine = TinyEngine()
    for step in (2, 4, 6):
        checkpoint.save_checkpoint(tmp_path, step, engine, {"step": step})
    (tmp_path / "step-000006" / checkpoint.MARKER).unlink()
    (tmp_path / ".step-000008.partial").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000004"
    checkpoint.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006"]
    torch.manual_seed(5)
    state = checkpoint.load_checkpoint(tmp_path / "step-000004", TinyEngine())
    assert state == {"step": 4}


def test_every_file_reaches_the_disk_before_complete_which_lists_their_sizes(tmp_path, monkeypatch):
    log = FsyncLog(monkeypatch)
    folder = checkpoint.save_checkpoint(tmp_path, 2, TinyEngine(), {"step": 2})
    complete = log.first("rename", f"step-000002/{checkpoint.MARKER}")
    for name in ("engine.pt", "rng-rank0.pt", "meta.json", "trainer_state.json"):
        assert log.first("fsync", f"/{name}") < complete, name
    assert log.first("rename", "/step-000002") < log.events.index(("fsync", str(tmp_path))) < complete
    listed = json.loads((folder / checkpoint.MARKER).read_text())["files"]
    assert {name: record["bytes"] for name, record in listed.items()} == {
        p.name: p.stat().st_size for p in folder.iterdir() if p.name != checkpoint.MARKER}


def test_a_checkpoint_whose_files_differ_from_complete_is_set_aside(tmp_path, caplog):
    for step in (2, 4):
        checkpoint.save_checkpoint(tmp_path, step, TinyEngine(), {"step": step})
    engine_file = tmp_path / "step-000004" / "engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:-1])
    logging.getLogger("ftpipe.train").addHandler(caplog.handler)
    try:
        assert checkpoint.usable_checkpoint(tmp_path).name == "step-000002"
    finally:
        logging.getLogger("ftpipe.train").removeHandler(caplog.handler)
    assert (tmp_path / "step-000004.corrupt" / "engine.pt").is_file()  # kept, never deleted
    assert f"{tmp_path / 'step-000004'} set aside as step-000004.corrupt: {engine_file} has" in caplog.text
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000002"


def test_a_full_disk_leaves_no_partial_and_the_earlier_checkpoints(tmp_path, monkeypatch):
    engine = TinyEngine()
    checkpoint.save_checkpoint(tmp_path, 2, engine, {"step": 2})

    def disk_full(folder):
        (folder / "engine.pt").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "save", disk_full)
    full = r"\.step-000004\.partial-\w+: no space left on device .*about .* needed"
    with pytest.raises(UserError, match=full):
        checkpoint.save_checkpoint(tmp_path, 4, engine, {"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]
    assert checkpoint.damage(tmp_path / "step-000002") is None


def test_consolidation_refuses_a_checkpoint_whose_files_changed(tmp_path):
    from pipeline.checkpoint_readers import open_checkpoint

    folder = checkpoint.save_checkpoint(tmp_path, 2, TinyEngine(), {"step": 2})
    state = folder / "trainer_state.json"
    state.write_text(state.read_text() + " ")
    with pytest.raises(UserError, match=rf"^{state} has \d+ bytes, but {folder / 'COMPLETE'} vouches for"):
        open_checkpoint(folder)
