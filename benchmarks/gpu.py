"""The prepared GPU check: ftpipe's real stages on one GPU, in one call of at most 8 minutes.

    bash benchmarks/gpu_check.sh [ARGS]            on the GPU machine (installs the carried wheels first)
    python benchmarks/gpu.py --fetch-wheels        here, before: the wheels it needs into benchmarks/wheels
    python benchmarks/gpu.py --cpu-smoke [--out D] anywhere: everything shrunk, on the CPU (a CI test)

A 0.5B-class Llama built from a config (random init, bf16 safetensors, the tests' tiny tokenizer) is
trained through `ftpipe run` (shard, tokenize, train) at L=2048 packed, in bf16, with sdpa,
flex_attention and flash_attention_2 (when flash_attn is importable) and with FSDP2 on one rank; the
sdpa run is also consolidated and evaluated. The same packed rows are scored packed and unpacked
through the loop's objective (equal within a stated tolerance). Each run reports steady-state tokens/s,
MFU against the bf16 matmul peak measured here, attention's FLOPs apart, and CUDA memory peaks.
Output: gpu_check.json + gpu_check.md in --out (default $OUT when set, else runs/gpu-check).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from benchmarks import gpu_report, gpu_runs

WHEELS_DIR = ROOT / "benchmarks" / "wheels"
# What the GPU machine lacks that a run with tracking off and strategy single/fsdp imports: pydantic
# (pipeline/config.py) and its own needs; typing_extensions because pydantic needs >= 4.14.1. pyyaml,
# psutil, tqdm, numpy, pyarrow, accelerate, safetensors and tokenizers are there already. Pinned to
# the versions the test suite runs with.
WHEELS = ("pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0", "typing-inspection==0.4.2",
          "typing-extensions==4.16.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
BUDGET_SECONDS = 420  # runs not started by then are skipped: the device call allows 8 minutes in all
CHILD_TIMEOUT = 180

GPU = {"size": "0.5b", "max_len": 2048, "micro_batch": 8, "steps": 25, "precision": "bf16", "tokens": 700_000,
       "eval_fraction": 0.01, "eval_rows": 8, "matmul": (8192, "bfloat16"), "scratch_gib": 32}
SMOKE = {"size": "smoke", "max_len": 64, "micro_batch": 2, "steps": 2, "precision": "fp32", "tokens": 3000,
         "eval_fraction": 0.1, "eval_rows": 4, "matmul": (256, "float32"), "scratch_gib": 1}


def fetch_wheels() -> int:
    """pip download the wheels for the GPU machine's Python 3.12 into benchmarks/wheels (gitignored)."""
    WHEELS_DIR.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS_DIR),
                    *WHEELS], check=True)
    files = sorted(WHEELS_DIR.glob("*.whl"))
    for wheel in files:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{sum(w.stat().st_size for w in files) / 2**20:8.2f} MiB  in {len(files)} wheels in {WHEELS_DIR}")
    return 0


def variants(settings: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    """The train runs: one per attention backend, FSDP2 on one rank, all packed at max_len."""
    import importlib.util

    if smoke:
        backends = [("sdpa", "single"), ("sdpa", "fsdp")]
    else:
        backends = [("sdpa", "single"), ("sdpa", "fsdp"), ("flex_attention", "single")]
        if importlib.util.find_spec("flash_attn") is not None:
            backends.append(("flash_attention_2", "single"))
    return [{"name": f"{attn}-{strategy}".replace("_", "-"), "attn": attn, "strategy": strategy,
             "packed": True, "evaluate": i == 0} for i, (attn, strategy) in enumerate(backends)]


def loss_checks(smoke: bool) -> list[tuple[str, str, float]]:
    """(backend, precision, relative tolerance on the mean loss). fp32 must agree to rounding; bf16
    autocast rounds every product's inputs to 8 bits of mantissa (relative 4e-3 each), and padding
    and packing change the kernels' shapes, so a summed loss of thousands of tokens moves by up to
    about 1e-3 relative: 5e-3 is the bar."""
    if smoke:
        return [("sdpa", "fp32", 1e-5), ("eager", "fp32", 1e-5)]
    import importlib.util

    checks = [("sdpa", "fp32", 1e-4), ("sdpa", "bf16", 5e-3), ("flex_attention", "fp32", 1e-4),
              ("flex_attention", "bf16", 5e-3)]
    if importlib.util.find_spec("flash_attn") is not None:
        checks.append(("flash_attention_2", "bf16", 5e-3))
    return checks


def hide_missing_on_device() -> None:
    """Make the packages the GPU machine lacks unimportable here too (there this changes nothing): a
    None in sys.modules makes `import` raise and importlib.util.find_spec answer None (how transformers
    asks). Otherwise transformers imports an installed DeepSpeed, and DeepSpeed MLflow, whatever ftpipe
    does, and a CPU run could not show that ftpipe's own path needs none of them."""
    for name in gpu_runs.NOT_ON_DEVICE:
        sys.modules.setdefault(name, None)


def environment() -> dict[str, Any]:
    import importlib.util

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name() if cuda else "CPU",
            "flash_attn": importlib.util.find_spec("flash_attn") is not None}


def run_child(kind: str, spec: dict[str, Any], in_process: bool, timeout: float) -> Any:
    """gpu_runs.train_variant or .loss_check, in a child process on the GPU (a crash or hang costs
    that run only; its CUDA peaks are its own), in this process for the CPU smoke run."""
    work = getattr(gpu_runs, kind)
    if in_process:
        return work(spec)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec), result.name],
                       check=True, timeout=timeout)
        return json.loads(Path(result.name).read_text())


def child(kind: str, spec_json: str, result_file: str) -> int:
    hide_missing_on_device()
    Path(result_file).write_text(json.dumps(getattr(gpu_runs, kind)(json.loads(spec_json)), default=str))
    return 0


class Check:
    """The report as it grows; written after every run, so a timeout still leaves what was measured."""

    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]):
        self.args, self.settings, self.started = args, settings, time.monotonic()
        self.smoke = args.cpu_smoke
        self.in_process = self.smoke and not args.isolate
        self.work = Path(args.work) if args.work else gpu_runs.scratch_folder(settings["scratch_gib"])
        self.report: dict[str, Any] = {
            "mode": "cpu-smoke" if self.smoke else "gpu", "max_len": settings["max_len"],
            "micro_batch": settings["micro_batch"], "steps": settings["steps"], "runs": [], "loss_checks": [],
            "problems": [], "timings": {}, "work": str(self.work)}

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def save(self) -> None:
        self.report["seconds"] = round(time.monotonic() - self.started, 1)
        self.report["imported_but_missing_on_device"] = gpu_runs.imported_but_missing_on_device()
        gpu_report.write(self.report, self.args.out)

    def prepare(self) -> None:
        s = self.settings
        self.report["environment"] = environment()
        self.report["peak"] = gpu_runs.matmul_peak(*s["matmul"])
        self.model = self.work / "model"
        self.report["model"] = gpu_runs.build_model(self.model, s["size"], s["max_len"])
        self.data = gpu_runs.write_documents(self.work / "data" / "docs.jsonl", s["tokens"], s["max_len"])
        self.report["timings"]["prepare"] = round(time.monotonic() - self.started, 1)
        self.save()

    def spec(self, run: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        keys = ("max_len", "micro_batch", "steps", "precision", "eval_fraction", "eval_rows")
        return {**run, **{k: s[k] for k in keys}, "model": str(self.model), "data": str(self.data),
                "output_dir": str(self.work / "runs"), "shape": self.report["model"]}

    def attempt(self, what: str, call) -> Any:
        if self.left() < 30:
            self.report["problems"].append(f"{what}: skipped, the time budget was spent")
            return None
        started = time.monotonic()
        try:
            return call(min(CHILD_TIMEOUT, self.left()))
        except Exception as err:  # noqa: BLE001 - the report says what failed; the other runs go on
            self.report["problems"].append(f"{what}: {type(err).__name__}: {str(err)[:300]}")
            return None
        finally:
            self.report["timings"][what] = round(time.monotonic() - started, 1)
            self.save()

    def train_runs(self, runs: list[dict[str, Any]]) -> None:
        for run in runs:
            self.report["runs"].append(run)
            result = self.attempt(
                run["name"], lambda t, r=run: run_child("train_variant", self.spec(r), self.in_process, t)
            )
            if result is None:
                run["error"] = "failed (see problems)"
                continue
            gpu_report.add_mfu(result, self.report["peak"]["flops_per_second"])
            run["result"] = result
            self.save()

    def loss_runs(self) -> None:
        first = self.report["runs"][0]
        partial = self.work / "loss_checks.json"
        spec = {"model": str(self.model), "tokenized_run": str(self.work / "runs" / first["name"]),
                "micro_batch": self.settings["micro_batch"], "checks": loss_checks(self.smoke),
                "partial": str(partial)}
        checks = self.attempt("loss check", lambda t: run_child("loss_check", spec, self.in_process, t))
        if checks is None and partial.is_file():  # it failed or timed out after some checks
            checks = json.loads(partial.read_text())
        self.report["loss_checks"] = checks or []
        for c in self.report["loss_checks"]:
            if not c.get("equal"):
                self.report["problems"].append(f"loss check {c['attn']} {c['precision']}: "
                                               f"{c.get('error') or 'packed and unpacked losses differ'}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, L=64, 2 steps, sdpa/eager, CPU")
    parser.add_argument("--fetch-wheels", action="store_true", help=f"download {', '.join(WHEELS)}")
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    parser.add_argument("--out", type=Path, default=out, help=f"report folder (default {out})")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 25; smoke 2)")
    parser.add_argument("--isolate", action="store_true", help="--cpu-smoke: each run in a child process too")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds; later runs skip")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(*argv[1:4])
    args = parse(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    settings = {**(SMOKE if args.cpu_smoke else GPU)}
    settings["steps"] = args.steps or settings["steps"]
    hide_missing_on_device()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check = Check(args, settings)
    try:
        check.prepare()
        runs = variants(settings, args.cpu_smoke)
        check.train_runs(runs[:1])  # the most telling first, in case time runs out: sdpa + evaluate,
        check.loss_runs()  # the loss check on its tokenized rows, FSDP2, then flex (compiles) and flash
        check.train_runs(runs[1:])
        check.save()
    finally:
        if not args.work:  # a scratch folder of our own (in /dev/shm: memory)
            shutil.rmtree(check.work, ignore_errors=True)
    print((args.out / "gpu_check.md").read_text())
    return 0 if not check.report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
