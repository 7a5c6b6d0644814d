"""benchmarks/train.py on the tiny Llama: ftpipe's train stage, TRL's SFTTrainer and the padding HF
Trainer, two steps each; the table's rows and columns, and real tokens counted from the trained batches.

Every row of the data has the same number of tokens (k), so the counts are known exactly: the padded
Trainer trains micro_batch x k real tokens a step (not micro_batch x max_len), and for examples of n
tokens each, the attention work sum n(n+1) is tokens x (n + 1)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import fixtures

ROOT = Path(__file__).resolve().parents[2]
MAX_LEN, MICRO, STEPS, K = 64, 4, 2, 13
COLUMNS = "| trainer | real tokens/s | vs TRL | MFU (6N) | attention MFU | peak RSS MiB | first losses |"
TRAINERS = ["ftpipe (train stage, packed)", "TRL SFTTrainer (packing)", "HF Trainer (pad to max_length)"]


def same_length_rows(model_dir: Path, count: int) -> list[dict[str, str]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [t for t in fixtures.sentences(2000, seed=3) if len(tokenizer(t)["input_ids"]) == K]
    assert len(texts) >= count
    return [{"text": t} for t in texts[:count]]


@pytest.fixture(scope="module")
def bench_run(tiny_llama, tmp_path_factory):
    pytest.importorskip("trl", reason='TRL is not installed (pip install -e ".[bench]")')
    folder = tmp_path_factory.mktemp("train-bench")
    data = fixtures.write_jsonl(folder / "rows.jsonl", same_length_rows(tiny_llama, 40))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), str(tiny_llama), str(data),
                           "--steps", str(STEPS), "--warmup", "1", "--max-len", str(MAX_LEN),
                           "--micro-batch", str(MICRO), "--json", str(folder / "out.json")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads((folder / "out.json").read_text())


def test_prints_one_table_and_the_targets(bench_run):
    done, report = bench_run
    lines = done.stdout.splitlines()
    start = lines.index(COLUMNS)
    rows = [line.split(" | ") for line in lines[start + 2: start + 5]]
    assert [row[0].lstrip("| ") for row in rows] == TRAINERS
    assert all(len(row) == 7 and len(row[6].rstrip(" |").split(", ")) == STEPS for row in rows)
    assert rows[1][2] == "1.00x"
    goals = [line for line in lines if line.startswith("- ftpipe")]
    assert [line.endswith(": met") or line.endswith(": missed") for line in goals] == [True] * 3
    assert done.returncode == (0 if all(t["met"] for t in report["targets"]) else 1)


def test_counts_real_tokens_of_the_trained_batches(bench_run):
    _, report = bench_run
    records = report["records"]
    assert [s["tokens"] for s in records["padded"]["steps"]] == [MICRO * K] * STEPS  # not MICRO * MAX_LEN
    for name, record in records.items():
        assert len(record["steps"]) == STEPS and len(record["losses"]) == STEPS, name
        for step in record["steps"]:
            per_example = step["attention"] / step["tokens"] - 1
            assert per_example in (K, K + 1, K + 2) and step["tokens"] <= MICRO * MAX_LEN, (name, step)
    # Packing puts more real tokens in a step than padding; ftpipe's counts are the loop's own.
    assert min(s["tokens"] for s in records["trl"]["steps"]) > MICRO * K
    assert sum(s["tokens"] for s in records["ftpipe"]["steps"]) == records["ftpipe"]["tokens_trained"]
    assert report["results"]["padded"]["peak_rss_mib"] > 100 and report["peak"]["flops_per_second"] > 0
    # Probed before and after the trainers; the higher counts (a slow minute must not flatter the MFU).
    peak = report["peak"]
    assert len(peak["probes"]) == 2 and peak["flops_per_second"] == max(peak["probes"])


def test_the_padded_trainers_rows_are_set_against_its_whole_dataset(bench_run):
    """Every row here holds k tokens, so the rows drawn are the dataset's mean and the two rates agree."""
    done, report = bench_run
    assert report["records"]["padded"]["mean_step_tokens"] == MICRO * K
    padded = report["results"]["padded"]
    assert padded["tokens_per_second_at_mean_rows"] == pytest.approx(padded["tokens_per_second"])
    step = MICRO * K
    assert f"held {step} real tokens a step, its dataset's rows {step} a step on average" in done.stdout


def test_rows_shorter_than_the_datasets_mean_show_in_the_padded_rate():
    from benchmarks import train_report

    shape = {"layers": 1, "q_width": 1}
    steps = [{"tokens": t, "attention": 0, "seconds": 2.0} for t in (300, 100, 140)]
    padded = train_report.figures({"steps": steps, "losses": [], "parameters": 1, "mean_step_tokens": 240},
                                  1, shape, 1.0)
    assert padded["tokens_per_second"] == 60 and padded["tokens_per_second_at_mean_rows"] == 120
    ftpipe = {"tokens_per_second": 1200.0}
    line = train_report.rows_drawn({"ftpipe": ftpipe, "padded": padded})[1]
    assert "held 120 real tokens a step, its dataset's rows 240 a step on average" in line
    assert line.endswith("at that mean it would train 120.0 tokens/s (ftpipe / that: 10.00x)")
    del padded["tokens_per_second_at_mean_rows"]  # TRL's and ftpipe's packed rows have no such figure
    assert train_report.rows_drawn({"ftpipe": ftpipe, "padded": padded}) == []


def test_example_lengths_of_padded_and_packed_batches():
    from benchmarks.train_runs import example_lengths

    ids = torch.zeros((2, 6), dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert example_lengths(ids, mask) == [3, 5]
    positions = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0]])
    assert example_lengths(ids, None, positions) == [2, 3, 1, 3, 1, 1, 1]
    assert example_lengths(ids, mask, positions) == [2, 1, 3, 1, 1]
