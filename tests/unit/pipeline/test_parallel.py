"""Shard and tokenize in parallel worker processes: same output as one worker, a killed worker costs
only its unfinished shards, and each shard piece is cached on its own fingerprint."""

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.parallel import run_tasks
from pipeline.run_dir import RunDir
from tests import fixtures
from tests.helpers import ftpipe, ftpipe_process, manifest

# After the first finished task: kill the worker process that ran it (the pool breaks, the run
# stops with a one-line error), or, where the workers are threads (tokenize with a Rust tokenizer),
# the whole process, as a lost node would. Units finished so far keep their markers.
KILL_AFTER_FIRST_TASK = """
import os, signal
import pipeline.units as units
_run_tasks = units.run_tasks
def run_and_kill(task, *args, **kwargs):
    for number, done in enumerate(_run_tasks(task, *args, **kwargs)):
        if number == 0 and task.args[0].name == "{stage}":  # task: run_task bound to the unit stage
            os.kill(done.pid, signal.SIGKILL)
        yield done
units.run_tasks = run_and_kill
"""
DATA_STAGES = ("--no-progress", "--stages", "shard,tokenize")


def _sources(tmp_path: Path) -> list[Path]:
    texts = fixtures.sentences(600, seed=5)
    return [fixtures.write_jsonl(tmp_path / "data" / f"{name}.jsonl", [{"text": t} for t in part])
            for name, part in (("a", texts[:350]), ("b", texts[350:]))]


def _config(tmp_path: Path, model: Path, name: str, workers: int, shards: int = 2, **data) -> Path:
    cfg = fixtures.causal_config(tmp_path, model, tmp_path / "data" / "a.jsonl", name=name, data={
        "train": [str(p) for p in sorted((tmp_path / "data").glob("*.jsonl"))], "num_shards": shards,
        "num_workers": workers, **data})
    return fixtures.write_config(tmp_path / f"{name}.yaml", cfg)


def _outputs(run: Path) -> dict[str, bytes]:
    files = sorted((run / "tokenize").glob("*/[0-9]*.arrow")) + sorted((run / "shard" / "data").glob("*"))
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def _mtimes(run: Path) -> dict[str, int]:
    return {f"{p.parent.name}/{p.name}": p.stat().st_mtime_ns
            for p in (run / "tokenize").glob("*/[0-9]*.json")}


def test_two_workers_write_the_same_bytes_as_one(tmp_path, tiny_llama):
    _sources(tmp_path)
    for name, workers in (("one", 1), ("two", 2)):
        assert ftpipe("run", _config(tmp_path, tiny_llama, name, workers), *DATA_STAGES) == 0
    one, two = (_outputs(tmp_path / "runs" / n) for n in ("one", "two"))
    assert len(one) == 2 * 2 * 2 + 2 * 2 + 1  # units (shards x sources x splits), shard files, rejects
    assert one == two
    splits = [manifest(tmp_path / "runs" / n, "tokenize")["splits"] for n in ("one", "two")]
    assert splits[0] == splits[1] and splits[0]["train"]["rows"] + splits[0]["eval"]["rows"] == 600


def test_killed_tokenize_reruns_only_missing_shards(tmp_path, tiny_llama):
    _sources(tmp_path)
    assert ftpipe("run", _config(tmp_path, tiny_llama, "whole", 2, shards=4), *DATA_STAGES) == 0
    killed = _config(tmp_path, tiny_llama, "killed", 2, shards=4)
    result = ftpipe_process("run", killed, *DATA_STAGES,
                            script=KILL_AFTER_FIRST_TASK.format(stage="tokenize"))
    assert result.returncode == -9, result.stderr  # threads: the process itself went
    run = tmp_path / "runs" / "killed"
    assert not (run / "tokenize" / "manifest.json").exists()
    before = _mtimes(run)
    assert 1 <= len(before) < 16
    assert ftpipe("run", killed, *DATA_STAGES) == 0
    tokenized = manifest(run, "tokenize")
    assert (tokenized["reused_shards"], tokenized["ran_shards"]) == (len(before), 16 - len(before))
    after = _mtimes(run)
    assert {k: after[k] for k in before} == before  # finished units were not redone
    assert _outputs(run) == _outputs(tmp_path / "runs" / "whole")


def test_a_killed_worker_process_costs_only_its_sources(tmp_path, tiny_llama):
    # b is long enough to be still running when a's worker is killed
    fixtures.write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": t} for t in fixtures.sentences(50, seed=1)])
    fixtures.write_jsonl(tmp_path / "data" / "b.jsonl",
                         [{"text": t} for t in fixtures.sentences(60000, seed=2)])
    config = _config(tmp_path, tiny_llama, "killed", 2)
    result = ftpipe_process("run", config, *DATA_STAGES, script=KILL_AFTER_FIRST_TASK.format(stage="shard"))
    assert result.returncode == 2 and "a worker process died" in result.stderr, result.stderr
    run = tmp_path / "runs" / "killed"
    markers = sorted((run / "shard" / "parts").glob("*/done.json"))
    assert len(markers) == 1 and not (run / "shard" / "manifest.json").exists()
    before = markers[0].stat().st_mtime_ns
    assert ftpipe("run", config, *DATA_STAGES) == 0
    assert (manifest(run, "shard")["reused_sources"], manifest(run, "shard")["ran_sources"]) == (1, 1)
    assert markers[0].stat().st_mtime_ns == before


def _ran(run: Path) -> tuple[int, int, list[str]]:
    shard, tokenized = manifest(run, "shard"), manifest(run, "tokenize")
    return shard["ran_sources"], tokenized["ran_shards"], sorted(_mtimes(run))


def _changed(old: dict[str, int], run: Path) -> list[str]:
    return sorted(name for name, mtime in _mtimes(run).items() if old.get(name) != mtime)


def test_only_work_whose_inputs_changed_reruns(tmp_path, tiny_llama):
    a, b = _sources(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = _config(tmp_path, model, "cache", 2)
    run = tmp_path / "runs" / "cache"
    assert ftpipe("run", cfg, *DATA_STAGES) == 0
    assert (manifest(run, "shard")["ran_sources"], manifest(run, "tokenize")["ran_shards"]) == (2, 8)

    # b is source 1: its pieces are units 1 and 3 of each split (shard-major, source-minor)
    old = _mtimes(run)
    b.write_text(b.read_text().replace("cat", "dog"))
    assert ftpipe("run", cfg, *DATA_STAGES) == 2 and _changed(old, run) == []  # finished work is kept
    assert ftpipe("run", cfg, *DATA_STAGES, "--force", "shard") == 0  # ...until forced: only what changed
    assert manifest(run, "shard")["reused_sources"] == 1 and manifest(run, "shard")["ran_sources"] == 1
    assert manifest(run, "tokenize")["ran_shards"] == 4
    assert _changed(old, run) == ["eval/00001.json", "eval/00003.json", "train/00001.json",
                                  "train/00003.json"]

    # a tokenize key: every unit, no shard work
    old = _mtimes(run)
    assert ftpipe("run", cfg, *DATA_STAGES, "data.max_seq_len=24", "--force", "tokenize") == 0
    assert manifest(run, "shard")["run_id"] and manifest(run, "tokenize")["ran_shards"] == 8
    assert len(_changed(old, run)) == 8

    # the tokenizer's files: every unit
    tokenizer = model / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    assert ftpipe("run", cfg, *DATA_STAGES, "data.max_seq_len=24", "--force", "tokenize") == 0
    assert (manifest(run, "shard")["ran_sources"], manifest(run, "tokenize")["ran_shards"]) == (1, 8)

    # nothing changed: both stages skipped; --force tokenize redoes every unit, reuses the shard
    shard_id = manifest(run, "shard")["run_id"]
    assert ftpipe("run", cfg, *DATA_STAGES, "data.max_seq_len=24", "--force", "tokenize") == 0
    assert manifest(run, "shard")["run_id"] == shard_id
    assert (manifest(run, "tokenize")["reused_shards"], manifest(run, "tokenize")["ran_shards"]) == (0, 8)


@pytest.mark.parametrize("key", ["data.eval_fraction=0.3", "data.num_shards=3"])
def test_shard_keys_redo_every_source(tmp_path, tiny_llama, key):
    _sources(tmp_path)
    cfg = _config(tmp_path, tiny_llama, "keys", 1)
    run = tmp_path / "runs" / "keys"
    assert ftpipe("run", cfg, *DATA_STAGES) == 0
    assert ftpipe("run", cfg, *DATA_STAGES, key, "--force", "shard") == 0
    shards = 3 if key.endswith("=3") else 2
    assert (manifest(run, "shard")["ran_sources"] == 2
            and manifest(run, "tokenize")["ran_shards"] == 2 * 2 * shards)
    assert len(list((run / "tokenize" / "train").glob("*.arrow"))) == 2 * shards  # no stale units left


def _tokenizers_parallelism(cfg, run_dir, rank, world_size):
    return os.environ.get("TOKENIZERS_PARALLELISM")


@pytest.mark.parametrize("cores, seen", [(2, "false"), (8, "true")])
def test_worker_threads_that_fill_the_cores_keep_rust_calls_on_their_thread(monkeypatch, cores, seen):
    """2 worker threads: on 2 cores each Rust call stays on its thread; on 8 (faked: this machine has
    fewer) the calls may spread. The variable is back as it was once the tasks end."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    tasks = run_tasks(_tokenizers_parallelism, None, RunDir(Path(".")), [0, 1, 2], 3, workers=2, threads=True)
    done = list(tasks)
    assert {d.result for d in done} == {seen} and os.environ["TOKENIZERS_PARALLELISM"] == "true"
