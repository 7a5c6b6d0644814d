import os
from pathlib import Path

import pytest

from tests import fixtures

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return fixtures.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return fixtures.build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def text_data(tmp_path) -> Path:
    return fixtures.write_jsonl(tmp_path / "data" / "text.jsonl",
                                [{"text": s} for s in fixtures.sentences(120)])


@pytest.fixture
def labelled_data(tmp_path) -> Path:
    return fixtures.write_jsonl(tmp_path / "data" / "labelled.jsonl", fixtures.labelled(400))
