"""data.packing: packed rows hold whole examples, never cross max_seq_len, and give exactly the
losses and logits of the examples computed one by one (attention and positions restart at every
example, no target is predicted across a boundary)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from pipeline.config import DataConfig, load_config, validate_config
from pipeline.distributed import DistEnv
from pipeline.encoding import Encoder
from pipeline.errors import UserError
from pipeline.eval_metrics import language_model_metrics, language_model_sums
from pipeline.formats import render_instruction
from pipeline.packing import Packer
from pipeline.runner import plan
from pipeline.tokenized import open_split
from pipeline.train.data import BatchLayout, TrainBatches, collate
from pipeline.train.objective import model_inputs, summed_loss
from tests import fixtures
from tests.helpers import ftpipe, manifest

INSTRUCTIONS = [("name a red thing", "the sun at night"), ("describe the cat", "a happy cat on the mat"),
                ("say good", "good")]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def encoded(tokenizer, fmt: str) -> dict[str, list]:
    """Three examples as the tokenize stage encodes them for packing (with a loss_mask for instruction)."""
    data = DataConfig(train=["x"], format=fmt, max_seq_len=128, packing=True)
    if fmt == "text":
        rows = {"text": fixtures.sentences(3, seed=7)}
    else:
        rows = {"prompt": [render_instruction(i) for i, _ in INSTRUCTIONS],
                "completion": [o for _, o in INSTRUCTIONS]}
    rows.update(source=["x"] * 3, line=[1, 2, 3])
    return Encoder(tokenizer, data)(rows).columns


def pack_all(columns: dict[str, list], max_len: int, open_rows: int = 4) -> dict[str, list]:
    packer = Packer(max_len, "loss_mask" in columns, open_rows)
    first, rest = packer.add(columns), packer.finish()
    return {name: first[name] + rest[name] for name in first}


def masks_of(columns: dict[str, list], index: int | None = None) -> list[list[int]] | None:
    if "loss_mask" not in columns:
        return None
    return columns["loss_mask"] if index is None else [columns["loss_mask"][index]]


@pytest.mark.parametrize("fmt", ["text", "instruction"])
def test_packed_loss_is_the_sum_of_the_examples_losses(tokenizer, model, fmt):
    columns = encoded(tokenizer, fmt)
    packed = pack_all(columns, max_len=200)
    assert packed["seq_lens"] == [[len(i) for i in columns["input_ids"]]]  # one row of all three
    # a short second row pads the batch: its padding must change nothing
    short = [columns["input_ids"][2][:5]]
    short_mask = [columns["loss_mask"][2][:5]] if "loss_mask" in columns else None
    batch = collate(packed["input_ids"] + short, pad_id=3,
                    masks=None if short_mask is None else packed["loss_mask"] + short_mask,
                    seq_lens=packed["seq_lens"] + [[5]])
    assert batch["input_ids"].shape[0] == 2 and int(batch["attention_mask"][1].sum()) == 5
    with torch.no_grad():
        got = float(summed_loss(model, batch, "causal_lm"))
        alone = [float(summed_loss(model, collate([ids], 3, masks_of(columns, i)), "causal_lm"))
                 for i, ids in enumerate(columns["input_ids"])]
        alone.append(float(summed_loss(model, collate(short, 3, short_mask), "causal_lm")))
    assert got == pytest.approx(sum(alone), rel=1e-5)
    # the counted targets are the stored num_targets: nothing predicted across a boundary
    assert (int((batch["labels"][0, 1:] != -100).sum()) == packed["num_targets"][0]
            == sum(columns["num_targets"]))


def test_packed_logits_equal_unpacked_logits(tokenizer, model):
    columns = encoded(tokenizer, "text")
    packed = pack_all(columns, max_len=200)
    batch = collate(packed["input_ids"] + [columns["input_ids"][0]], 3, seq_lens=packed["seq_lens"] + [[3]])
    assert batch["position_ids"][0].tolist() == [p for n in packed["seq_lens"][0] for p in range(n)]
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        start = 0
        for ids in columns["input_ids"]:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[0, start: start + len(ids)], alone, atol=1e-5, rtol=0)
            start += len(ids)


def test_bf16_autocast_accepts_the_packed_mask(tokenizer, model):
    columns = encoded(tokenizer, "text")
    packed = pack_all(columns, max_len=200)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = summed_loss(model, collate(packed["input_ids"], 3, seq_lens=packed["seq_lens"]), "causal_lm")
    assert torch.isfinite(loss)


def test_packer_keeps_every_example_once_within_max_len():
    lengths = [5, 9, 3, 12, 1, 7, 16, 2, 8, 8, 4, 11] * 20
    examples = [[i] * n for i, n in enumerate(lengths)]
    columns = {"input_ids": examples, "num_targets": [n - 1 for n in lengths]}
    packer = Packer(max_len=16, masked=False, open_rows=3)
    rows: dict[str, list] = {"input_ids": [], "num_targets": [], "seq_lens": []}
    for start in range(0, len(examples), 25):  # batch by batch, like the shard's parquet batches
        part = packer.add({k: v[start: start + 25] for k, v in columns.items()})
        assert len(packer._open) <= 3  # bounded memory
        for name in rows:
            rows[name] += part[name]
    for name, values in packer.finish().items():
        rows[name] += values
    assert packer.rows == len(rows["input_ids"])
    assert all(len(ids) == sum(lens) <= 16 for ids, lens in zip(rows["input_ids"], rows["seq_lens"]))
    split = [ids[sum(lens[:k]): sum(lens[: k + 1])] for ids, lens in zip(rows["input_ids"], rows["seq_lens"])
             for k in range(len(lens))]
    assert sorted(split) == sorted(examples)
    assert sum(rows["num_targets"]) == sum(columns["num_targets"])
    assert len(rows["input_ids"]) < len(examples) / 2


# --- the stages --------------------------------------------------------------------------------

def text_config(tmp_path, tiny_llama, name: str, packing: bool, **train) -> object:
    source = fixtures.write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in fixtures.sentences(120)])
    raw = fixtures.causal_config(tmp_path, tiny_llama, source, data={"packing": packing, "max_seq_len": 48},
                                 train={"max_steps": 2, **train})
    raw["name"] = name
    return fixtures.write_config(tmp_path / f"{name}.yaml", raw)


def examples_of(table: pa.Table) -> list[list[int]]:
    if "seq_lens" not in table.column_names:
        return table.column("input_ids").to_pylist()
    out = []
    for ids, lens in zip(table.column("input_ids").to_pylist(), table.column("seq_lens").to_pylist()):
        starts = [sum(lens[:k]) for k in range(len(lens))]
        out += [ids[s: s + n] for s, n in zip(starts, lens)]
    return out


def test_tokenize_packs_every_example_once_and_reports_efficiency(tmp_path, tiny_llama, model):
    for name, packing in (("plain", False), ("packed", True)):
        assert ftpipe("run", text_config(tmp_path, tiny_llama, name, packing), "--no-progress",
                      "--stages", "shard,tokenize") == 0
    for split in ("train", "eval"):
        plain = open_split(tmp_path / "runs" / "plain" / "tokenize" / split)
        packed = open_split(tmp_path / "runs" / "packed" / "tokenize" / split)
        assert sorted(examples_of(packed)) == sorted(examples_of(plain))
        assert max(len(ids) for ids in packed.column("input_ids").to_pylist()) <= 48
        stats = manifest(tmp_path / "runs" / "packed", "tokenize")["splits"][split]
        tokens = sum(len(ids) for ids in plain.column("input_ids").to_pylist())
        assert stats["rows"] == plain.num_rows and stats["packed_rows"] == packed.num_rows < plain.num_rows
        assert stats["packing_efficiency"] == pytest.approx(tokens / (packed.num_rows * 48))
        assert stats["examples_per_row"] == pytest.approx(plain.num_rows / packed.num_rows)
        assert stats["targets"] == sum(packed.column("num_targets").to_pylist()) == tokens - plain.num_rows
    # evaluation on the packed split scores exactly what it scores unpacked
    with torch.no_grad():
        got = language_model_metrics(language_model_sums(model, packed, 4, 3, DistEnv()))
        want = language_model_metrics(language_model_sums(model, plain, 4, 3, DistEnv()))
    assert got["eval_tokens"] == want["eval_tokens"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_packing_is_part_of_the_tokenize_fingerprint_only(tmp_path, tiny_llama):
    cfg = text_config(tmp_path, tiny_llama, "fp", False)
    assert ftpipe("run", cfg, "--no-progress", "--stages", "shard,tokenize") == 0
    packed = load_config(cfg, ["data.packing=true"])
    with pytest.raises(UserError, match=r"^tokenize: data\.packing: False -> True since it finished"):
        plan(packed, ["shard", "tokenize"])
    actions = {p.name: p.action for p in plan(packed, ["shard", "tokenize"], force=("tokenize",))}
    assert actions["shard"] == "skip" and actions["tokenize"] == "run"


def test_packing_classification_is_a_config_error(tmp_path):
    raw = fixtures.classification_config(tmp_path, tmp_path, tmp_path / "x.jsonl", data={"packing": True})
    with pytest.raises(UserError,
                       match=r"^<config>: data\.packing: format 'classification' cannot be packed"):
        validate_config(raw)


def test_packed_run_end_to_end(tmp_path, tiny_llama):
    cfg = text_config(tmp_path, tiny_llama, "e2e", True, micro_batch_size=2, grad_accum=2)
    assert ftpipe("run", cfg, "--no-progress") == 0
    run_dir = tmp_path / "runs" / "e2e"
    tok, train = manifest(run_dir, "tokenize"), manifest(run_dir, "train")
    assert train["steps"] == 2 and train["samples"] == 8  # a sample is a packed row
    table = open_split(run_dir / "tokenize" / "train")
    batch = TrainBatches(table, BatchLayout(2, 2, 1), seed=0, pad_id=tok["pad_token_id"]).micro_batch(0, 0, 0)
    assert "attention_bias" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    assert "rows" in batch
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["eval_tokens"] == tok["splits"]["eval"]["targets"] and metrics["loss"] > 0
    samples = (run_dir / "evaluate" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2
