"""Checkpoints count only with their marker; pruning keeps the newest."""

import torch

from pipeline.train import checkpoint


class _TinyEngine:
    def __init__(self):
        self.model = torch.nn.Linear(2, 2)

    def save(self, folder):
        torch.save(self.model.state_dict(), folder / "engine.pt")

    def load(self, folder):
        self.model.load_state_dict(torch.load(folder / "engine.pt"))

    def describe(self):
        return {"format": "custom"}


def test_a_checkpoint_is_written_under_a_temporary_name_of_its_own(tmp_path):
    """Another writer's partial save of the same step (the fixed name every save used to share) is not
    deleted under it."""
    theirs = tmp_path / ".step-000002.partial"
    theirs.mkdir()
    (theirs / "engine.pt").write_bytes(b"another writer's half")
    checkpoint.save_checkpoint(tmp_path, 2, _TinyEngine(), {"step": 2})
    assert (theirs / "engine.pt").read_bytes() == b"another writer's half"
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000002"
    assert list(tmp_path.glob(".step-*")) == [theirs]


def test_checkpoints_count_only_with_marker_and_are_pruned(tmp_path):
    engine = _TinyEngine()
    for step in (2, 4, 6):
        checkpoint.save_checkpoint(tmp_path, step, engine, {"step": step})
    (tmp_path / "step-000006" / checkpoint.MARKER).unlink()
    (tmp_path / ".step-000008.partial").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000004"
    checkpoint.prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006"]
    torch.manual_seed(5)
    state = checkpoint.load_checkpoint(tmp_path / "step-000004", _TinyEngine())
    assert state == {"step": 4}
