import os
from pathlib import Path

import pytest

from tests import fixtures
from tests.config_template import write_from_template
from tests.helpers import free_port

CLUSTER_DIR = Path(__file__).parent / "cluster"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Everything under tests/cluster/ starts a real SLURM cluster: marked `cluster`, so that
    `pytest -m "not cluster and not multirank"` is the quick loop.

    Under `pytest -n N --dist loadgroup` each test file runs in one worker (its module-scoped runs are
    made once), and the tests of each SLURM cluster in one worker (each cluster started once)."""
    for item in items:
        path = Path(item.fspath)
        if CLUSTER_DIR in path.parents:
            item.add_marker(pytest.mark.cluster)
        item.add_marker(pytest.mark.xdist_group(_group(path)))


def _group(path: Path) -> str:
    if CLUSTER_DIR not in path.parents:
        return str(path.relative_to(CLUSTER_DIR.parent))
    # The 1-node and the 2-node cluster are separate daemons, folders and ports: they may run at once.
    return "cluster-2-nodes" if "multinode" in path.name else "cluster"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return fixtures.build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return fixtures.build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """Enough of a model for stages that never load it: the checks before a run want a config.json
    and a weights file (here a safetensors file holding no tensors)."""
    return fixtures.fake_model_dir(tmp_path / "model")


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n')
    return path


@pytest.fixture
def write_cfg(tmp_path, model_dir, data_file):
    """write_cfg(replace={old_line: new_line}) -> path of a config made from config_template.BASE."""
    return lambda *args, **kwargs: write_from_template(tmp_path, model_dir, data_file, *args, **kwargs)


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
    yield from _cluster(tmp_path_factory.mktemp("slurm"), nodes=1)


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """A real 2-node SLURM cluster, each node a network namespace with its own address."""
    yield from _cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)


def _cluster(root, nodes: int):
    from tests.cluster.slurm_cluster import Unavailable, running_cluster

    try:
        with running_cluster(root, nodes) as cluster:
            yield cluster
    except Unavailable as err:
        pytest.skip(str(err))


@pytest.fixture
def mlflow_server(tmp_path):
    from tests.processes import kill_tree, start_mlflow_server

    port = free_port()
    proc = start_mlflow_server(tmp_path, port)
    yield f"http://127.0.0.1:{port}"
    kill_tree(proc)
