"""Training throughput of ftpipe's train stage beside TRL's SFTTrainer and the plain HF Trainer.

    python benchmarks/train.py [MODEL_DIR DATA.jsonl] [--precision fp32|bf16] [--steps N] [--warmup W]
                               [--max-len 256] [--micro-batch 8] [--json OUT]

Defaults to SmolLM2-135M and its chat.jsonl as examples/prepare_smollm2.py writes them (data/smollm2).
One after the other, on the same cores, each in a child process of its own (forked from this one after
the libraries are imported, so that each child's peak RSS is its own and no child pays the imports):
  ftpipe   `ftpipe run` on a generated config: packing, full fine-tune, one process, grad_accum 1;
  trl      TRL's SFTTrainer with packing (`pip install -e ".[bench]"`);
  padded   the HF Trainer with every row padded to max_length, the way most tutorials do it;
all on the same rows (every line's "text"), max_len, micro batch, precision and learning rate; before
and after them, the matmul peak at the model's own shapes, the higher of the two counting
(benchmarks/train_report.py says how).
Real (non-pad) tokens are counted from the batches each one trained; the first --warmup steps are left
out. Prints one markdown table and the targets of issue 15; exits 1 when a target is missed, 2 on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import importlib.util
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # children are forked
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import train_report, train_runs

DEFAULT_DIR = ROOT / "data" / "smollm2"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_DIR / "model"), help="Hugging Face model folder")
    ap.add_argument("data", nargs="?", default=str(DEFAULT_DIR / "chat.jsonl"), help='JSONL with "text"')
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per trainer")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    ap.add_argument("--work", type=Path, help="an empty scratch folder to keep (default: a temporary one)")
    return ap.parse_args(argv)


def input_error(args: argparse.Namespace) -> str | None:
    """The one-line reason the run cannot start, if any."""
    if not (Path(args.model) / "config.json").is_file():
        return (f"{args.model}: no config.json (prepare SmolLM2-135M with "
                "`python examples/prepare_smollm2.py`, or name a model folder)")
    if not Path(args.data).is_file():
        return f"{args.data}: no such file"
    if importlib.util.find_spec("trl") is None:
        return 'TRL is not installed: pip install -e ".[bench]"'
    if args.work and args.work.exists() and any(args.work.iterdir()):
        return f"--work {args.work}: not empty (a run there would resume instead of training anew)"
    if args.steps <= args.warmup or args.warmup < 0:
        return f"--steps ({args.steps}) must be more than --warmup ({args.warmup}), which must be >= 0"
    return None


def preload() -> None:
    """Import what every child needs once, here, before any child is forked (and before any torch
    computation: a process whose OpenMP threads have run cannot fork safely)."""
    import datasets  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from pipeline.train import stage  # noqa: F401

    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401 - accelerate imports it in both Hugging Face trainers when installed


def in_child(function: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """function(spec) in a forked child; its result and the child's peak RSS (wait4's, in MiB)."""
    result_file = Path(spec["work"]) / f"result-{function.__name__}-{spec.get('trainer', '')}.json"
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            result_file.write_text(json.dumps(function(spec)))
            code = 0
        except BaseException:  # noqa: BLE001 - the child reports any failure through its exit code
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    print(f"benchmarks/train.py: {function.__name__} {spec.get('trainer', '')} took "
          f"{time.monotonic() - started:.1f}s", file=sys.stderr)
    if code:
        raise RuntimeError(f"{function.__name__} ({spec.get('trainer')}) failed with exit code {code}")
    return {**json.loads(result_file.read_text()), "peak_rss_mib": usage.ru_maxrss / 1024}


def peak_child(spec: dict[str, Any]) -> dict[str, Any]:
    return train_report.matmul_peak(spec["shape"], spec["micro_batch"] * spec["max_len"], spec["precision"])


def run_all(spec: dict[str, Any]) -> dict[str, Any]:
    """The matmul peak, the three trainers, the peak again; the raw records and the higher peak (the
    machine's speed drifts: a peak probed in a slow minute would flatter every MFU)."""
    before = in_child(peak_child, spec)
    in_child(train_runs.ftpipe_prepare, spec)
    records = {"ftpipe": in_child(train_runs.ftpipe_train, {**spec, "trainer": "ftpipe"})}
    for trainer in ("trl", "padded"):
        records[trainer] = in_child(train_runs.hf_train, {**spec, "trainer": trainer})
    trained = {name: record["precision"] for name, record in records.items()}
    assert set(trained.values()) == {spec["precision"]}, f"asked for {spec['precision']}, trained {trained}"
    return {"peak": train_report.higher_peak(before, in_child(peak_child, spec)), "records": records}


def build_report(spec: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    peak = raw["peak"]
    results = {}
    for name, record in raw["records"].items():
        steady = train_report.figures(record, spec["warmup"], spec["shape"], peak["flops_per_second"])
        results[name] = {**steady, "peak_rss_mib": record["peak_rss_mib"]}
    report = {"settings": {k: spec[k] for k in ("model", "data", "precision", "steps", "warmup", "max_len",
                                                 "micro_batch")},
              "parameters": raw["records"]["ftpipe"]["parameters"], "shape": spec["shape"], "peak": peak,
              "results": results, "records": raw["records"]}
    report["targets"] = train_report.targets(results)
    return report


def benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = json.loads((Path(args.model) / "config.json").read_text())
    spec = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
            "precision": args.precision, "steps": args.steps, "warmup": args.warmup, "max_len": args.max_len,
            "micro_batch": args.micro_batch, "work": str(work), "shape": train_report.model_shape(config)}
    preload()
    return {**build_report(spec, run_all(spec)), "imports_rss_mib": rss_mib()}


def rss_mib() -> float:
    """This process's resident set now: the imported libraries every forked child starts with."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    problem = input_error(args)
    if problem:
        print(f"benchmarks/train.py: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ftpipe-train-bench-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        report = benchmark(args, work)
    print(train_report.markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if all(t["met"] for t in report["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
