"""The shard stage on its own."""

import pyarrow.parquet as pq

from pipeline import shard
from pipeline.config import validate_config
from tests import fixtures
from tests.stage_runs import stage_context


def test_shards_are_balanced_and_keep_every_row(tmp_path, tiny_llama):
    data = fixtures.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in fixtures.sentences(1000)])
    cfg = validate_config(fixtures.causal_config(tmp_path, tiny_llama, data, data={"num_shards": 4}))
    ctx = stage_context(cfg)
    manifest = shard.run(cfg, ctx)
    counts = manifest["splits"]["train"]["rows_per_shard"]
    assert sum(counts) + manifest["splits"]["eval"]["rows"] == 1000
    assert min(counts) > 150
    files = [ctx.run_dir.stage("shard") / "data" / f for f in manifest["splits"]["train"]["files"]]
    assert sum(pq.read_metadata(f).num_rows for f in files) == sum(counts)
