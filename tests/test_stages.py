"""Each stage on its own: tokenize counts, sample order, checkpoints, consolidation, metrics."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import evaluate, shard, tokenize, tokenized
from pipeline.config import validate_config
from pipeline.context import StageContext
from pipeline.run_dir import RunDir
from pipeline.train import checkpoint
from pipeline.train.data import BatchLayout, SampleOrder
from pipeline.train.engine import lr_factor
from tests import fixtures


def _ctx(cfg):
    run_dir = RunDir(cfg.run_dir)
    return StageContext(run_dir, progress=False)


def _run(stage, cfg, ctx):
    manifest = stage.run(cfg, ctx)
    manifest["run_id"] = "test"
    ctx.run_dir.write_manifest(stage.__name__.split(".")[-1], manifest)
    return manifest


def test_tokenize_counts_truncation_and_eos(tmp_path, tiny_llama):
    rows = [{"text": "the cat sat on the mat " * 20}] + [{"text": s} for s in fixtures.sentences(30)]
    data = fixtures.write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, data, data={"eval_fraction": 0.0,
                                                                                 "max_seq_len": 16}))
    ctx = _ctx(cfg)
    _run(shard, cfg, ctx)
    manifest = _run(tokenize, cfg, ctx)
    train = manifest["splits"]["train"]
    assert train["rows"] == 31 and train["truncated"] >= 1 and train["max_len"] == 16
    table = tokenized.open_split(ctx.run_dir.stage("tokenize") / "train")
    lengths = [len(x) for x in table.column("input_ids").to_pylist()]
    assert sum(lengths) == train["tokens"]
    assert table.column("num_targets").to_pylist() == [n - 1 for n in lengths]
    short = [ids for ids in table.column("input_ids").to_pylist() if len(ids) < 16]
    assert all(ids[-1] == manifest["pad_token_id"] - 1 for ids in short)  # </s> is id 2, <pad> is 3


def test_tokenize_resumes_only_missing_shards(tmp_path, tiny_llama, text_data):
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, text_data))
    ctx = _ctx(cfg)
    _run(shard, cfg, ctx)
    first = tokenize.run(cfg, ctx)
    folder = ctx.run_dir.stage("tokenize") / "train"
    (folder / "00001.json").unlink()
    again = tokenize.run(cfg, ctx)
    assert again["reused_shards"] == 3 and again["splits"] == first["splits"]


def test_shards_are_balanced_and_keep_every_row(tmp_path, tiny_llama):
    data = fixtures.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in fixtures.sentences(1000)])
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, data, data={"num_shards": 4}))
    ctx = _ctx(cfg)
    manifest = shard.run(cfg, ctx)
    counts = manifest["splits"]["train"]["rows_per_shard"]
    assert sum(counts) + manifest["splits"]["eval"]["rows"] == 1000
    assert min(counts) > 150
    files = [ctx.run_dir.stage("shard") / "data" / f for f in manifest["splits"]["train"]["files"]]
    assert sum(pq.read_metadata(f).num_rows for f in files) == sum(counts)


def test_sample_order_is_a_permutation_per_epoch_and_world_size_free():
    order = SampleOrder(10, seed=3)
    first, second = order.rows(0, 10), order.rows(10, 10)
    assert sorted(first) == list(range(10)) == sorted(second) and list(first) != list(second)
    assert list(order.rows(5, 10)) == list(first[5:]) + list(second[:5])
    one, two = BatchLayout(4, 2, 1), BatchLayout(2, 2, 2)
    assert one.global_batch == two.global_batch == 8
    seen = sorted(two.micro_start(24, m, r) + i for m in range(2) for r in range(2) for i in range(2))
    assert seen == list(range(24, 32))


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 10, 0.2) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and lr_factor(10, 10, 0.2) == 0.0
    # The schedule follows samples: two steps of 4 samples land where one of 8 does.
    assert lr_factor(20, 40, 0.1, global_batch=4) == lr_factor(20, 40, 0.1, global_batch=8) < 1.0
    assert lr_factor(0, 40, 0.5, global_batch=4) == 0.2


class _TinyEngine:
    def __init__(self):
        self.model = torch.nn.Linear(2, 2)

    def save(self, folder):
        torch.save(self.model.state_dict(), folder / "engine.pt")

    def load(self, folder):
        self.model.load_state_dict(torch.load(folder / "engine.pt"))

    def describe(self):
        return {"format": "custom"}


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


def test_classification_metrics_match_hand_counts():
    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    metrics = evaluate.summarize_predictions(truth, predicted, 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3)


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


def test_global_batch_size_fixes_the_global_batch_at_any_world_size():
    from pipeline.config import TrainConfig
    from pipeline.errors import UserError
    from pipeline.train.data import batch_layout

    cfg = TrainConfig(micro_batch_size=2, global_batch_size=8)
    assert [batch_layout(cfg, n).grad_accum for n in (1, 2, 4)] == [4, 2, 1]
    assert batch_layout(TrainConfig(micro_batch_size=2, grad_accum=3), 2).global_batch == 12
    with pytest.raises(UserError,
                       match="global_batch_size: 8 is not a multiple of micro_batch_size x ranks = 2 x 3"):
        batch_layout(cfg, 3)
