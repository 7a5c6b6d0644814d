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


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real 1-node SLURM cluster (own munged, slurmctld, slurmd); SLURM_CONF points at it."""
    from tests.slurm_cluster import SlurmCluster, Unavailable, ensure_installed

    try:
        ensure_installed()
    except Unavailable as err:
        pytest.skip(str(err))
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    previous = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
