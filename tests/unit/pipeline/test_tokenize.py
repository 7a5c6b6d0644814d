"""The tokenize stage on its own: counts, truncation, EOS, resuming per unit."""

import pyarrow as pa

from pipeline import shard, tokenize, tokenized
from pipeline.config import validate_config
from tests import fixtures
from tests.stage_runs import run_stage, stage_context


def test_tokenize_counts_truncation_and_eos(tmp_path, tiny_llama):
    rows = [{"text": "the cat sat on the mat " * 20}] + [{"text": s} for s in fixtures.sentences(30)]
    data = fixtures.write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, data, data={"eval_fraction": 0.0,
                                                                                 "max_seq_len": 16}))
    ctx = stage_context(cfg)
    run_stage(shard, cfg, ctx)
    manifest = run_stage(tokenize, cfg, ctx)
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
    ctx = stage_context(cfg)
    run_stage(shard, cfg, ctx)
    first = tokenize.run(cfg, ctx)
    folder = ctx.run_dir.stage("tokenize") / "train"
    (folder / "00001.json").unlink()
    again = tokenize.run(cfg, ctx)
    assert again["reused_shards"] == 3 and again["splits"] == first["splits"]


def test_a_unit_is_written_under_a_temporary_name_of_its_own(tmp_path, tiny_llama, text_data):
    """Another writer's half-written file of the same unit (the fixed name tokenize used to share) is
    neither overwritten nor renamed away."""
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, text_data))
    ctx = stage_context(cfg)
    run_stage(shard, cfg, ctx)
    unit = tokenize.UNITS.units(cfg, ctx.run_dir)[0]
    unit.folder.mkdir(parents=True)
    theirs = unit.folder / f".{unit.index:05d}.arrow.tmp-w"
    theirs.write_bytes(b"another writer's rows")
    stats = tokenize.UNITS.work(cfg, ctx.run_dir, unit)
    assert theirs.read_bytes() == b"another writer's rows"
    written = unit.folder / f"{unit.index:05d}.arrow"  # its marker comes from the unit runner, later
    with pa.ipc.open_stream(pa.memory_map(str(written))) as reader:
        assert reader.read_all().num_rows == stats["rows"] > 0
    assert list(unit.folder.glob(".*.tmp-*")) == [theirs]
