"""What the integrity checks cost: fsync before markers, file records (size + CRC-32 of each file's
first and last 64 KiB) in unit markers and COMPLETE, and the checks on reading and planning.

    python benchmarks/integrity.py [--mb 6] [--params 67] [--repeats 3] [--workdir DIR]

Tokenize: a few MB of generated text rows with the tests' tiny Llama tokenizer (byte-level BPE), the
stage run in this process (1 worker) --repeats times; the time spent in vouch_for (fsync of each
unit's files and folder, then their records) and in file_record alone, against the stage's wall time.
Then open_split's check of every unit and the planner's check (units.first_problem). Checkpoint: a
model of --params million fp32 parameters and an optimizer-sized second file, written by plain
torch.save and by save_checkpoint (fsync of every file, COMPLETE with the file records).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts run from benchmarks/ have it first on sys.path, where benchmarks/tokenize.py would shadow
# the standard library's tokenize module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import shutil
import statistics
import tempfile
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import run_dir, shard, tokenize, tokenized, units  # noqa: E402
from pipeline.config import validate_config  # noqa: E402
from pipeline.train import checkpoint  # noqa: E402
from tests import fixtures  # noqa: E402
from tests.stage_runs import run_stage, stage_context  # noqa: E402


class Timed:
    """Wraps a module function, adding up the seconds spent in it."""

    def __init__(self, module, name: str):
        self.seconds, real = 0.0, getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(module, name, timed)


def bench_tokenize(work: Path, mb: float, repeats: int) -> None:
    model = fixtures.build_tiny_llama(work / "model")
    rows = int(mb * 1e6 / 56)  # generated sentences average about 56 bytes as JSON lines
    data = fixtures.write_jsonl(work / "t.jsonl", [{"text": s} for s in fixtures.sentences(rows, seed=4)])
    settings = {"num_shards": 4, "max_seq_len": 64}
    cfg = validate_config(fixtures.causal_config(work, model, data, data=settings))
    ctx = stage_context(cfg)
    run_stage(shard, cfg, ctx)
    vouch, record = Timed(units, "vouch_for"), Timed(run_dir, "file_record")
    print(f"tokenize: {data.stat().st_size / 1e6:.1f} MB of jsonl, {rows} rows, 1 worker")
    print("| run | stage s | vouch_for (fsync + records) ms | file_record alone ms | Arrow MB |")
    print("|---|---|---|---|---|")
    for attempt in range(repeats):
        shutil.rmtree(ctx.run_dir.stage("tokenize"), ignore_errors=True)
        vouch.seconds = record.seconds = 0.0
        start = time.perf_counter()
        tokenize.run(cfg, ctx)
        wall = time.perf_counter() - start
        arrow = sum(p.stat().st_size for p in ctx.run_dir.stage("tokenize").rglob("*.arrow")) / 1e6
        print(f"| {attempt + 1} | {wall:.2f} | {vouch.seconds * 1e3:.1f} | {record.seconds * 1e3:.1f} "
              f"| {arrow:.1f} |")
    checks = {"open_split (train)": lambda: tokenized.open_split(ctx.run_dir.stage("tokenize") / "train"),
              "planner (first_problem)": lambda: units.first_problem(tokenize.UNITS, cfg, ctx.run_dir)}
    for name, check in checks.items():
        start = time.perf_counter()
        check()
        print(f"{name}: {(time.perf_counter() - start) * 1e3:.1f} ms")


class _Engine:
    def __init__(self, params_m: int):
        self.unwrapped = torch.nn.Linear(1024, params_m * 1024, bias=False)

    def save(self, folder: Path) -> None:
        torch.save(self.unwrapped.state_dict(), folder / "model.pt")
        torch.save({"exp_avg": self.unwrapped.weight.detach().clone()}, folder / "optimizer.pt")

    def describe(self) -> dict:
        return {"format": "benchmark"}


def bench_checkpoint(work: Path, params_m: int, repeats: int) -> None:
    engine = _Engine(params_m)
    plain, durable = [], []
    for step in range(1, repeats + 1):
        folder = work / f"plain-{step}"
        folder.mkdir()
        start = time.perf_counter()
        engine.save(folder)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        saved = checkpoint.save_checkpoint(work / "checkpoints", step, engine, {"step": step})
        durable.append(time.perf_counter() - start)
        shutil.rmtree(folder)
    start = time.perf_counter()
    checkpoint.damage(saved)
    check = time.perf_counter() - start
    size = run_dir.tree_bytes(saved) / 1e6
    print(f"checkpoint: {size:.0f} MB; plain torch.save median {statistics.median(plain):.2f} s, "
          f"save_checkpoint median {statistics.median(durable):.2f} s; COMPLETE check {check * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=6)
    parser.add_argument("--params", type=int, default=67, help="million parameters of the checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        bench_tokenize(Path(work) / "tokenize", args.mb, args.repeats)
        bench_checkpoint(Path(work), args.params, args.repeats)


if __name__ == "__main__":
    main()
