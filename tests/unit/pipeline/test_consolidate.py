"""The consolidate stage refuses a model whose logits differ from the checkpoint's."""

import json

import pytest

from tests import fixtures


def test_consolidate_refuses_a_model_that_does_not_match(tmp_path, tiny_bert, labelled_data, monkeypatch):
    from tests.helpers import ftpipe

    cfg_path = fixtures.write_config(tmp_path / "c.yaml", fixtures.classification_config(
        tmp_path, tiny_bert, labelled_data, train={"max_steps": 2}))
    assert ftpipe("run", cfg_path, "--no-progress", "--stages", "shard,tokenize,train") == 0
    from pipeline import hf_writer

    real_add = hf_writer.ShardedSafetensorsWriter.add

    def corrupt(self, name, tensor):
        real_add(self, name, tensor + 1.0 if name.endswith("classifier.bias") else tensor)

    monkeypatch.setattr(hf_writer.ShardedSafetensorsWriter, "add", corrupt)
    with pytest.raises(RuntimeError, match="differs from the checkpoint"):
        ftpipe("run", cfg_path, "--no-progress", "--stages", "consolidate")
    assert not (tmp_path / "runs" / "cls" / "consolidate" / "model").exists()
    assert not (tmp_path / "runs" / "cls" / "consolidate" / "manifest.json").exists()
    assert json.loads((tmp_path / "runs" / "cls" / "train" / "manifest.json").read_text())["steps"] == 2
