"""The two-rank test modules' one prepared dataset per module (tests/integration/distributed_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fixtures
from tests.helpers import ftpipe
from tests.integration.distributed_runs import DATA_RUN, run_config


@pytest.fixture(scope="module")
def dist_workspace(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    data = fixtures.write_jsonl(tmp / "text.jsonl", [{"text": s} for s in fixtures.sentences(160)])
    config = run_config(tmp, tiny_llama, data, DATA_RUN, {})
    assert ftpipe("run", config, "--stages", "shard,tokenize", "--no-progress") == 0
    return tmp, data
