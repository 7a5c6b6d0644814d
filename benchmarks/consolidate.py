"""Consolidating 2-rank ZeRO-1/2/3 checkpoints: ftpipe's DeepSpeed reader vs DeepSpeed's own streaming
API (get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)) and vs its zero_to_fp32.py script.

    python benchmarks/consolidate.py [--workdir DIR] [--repeats 3] [--write-docs]

Builds (once, kept in DIR) a random-init Llama of ~125M parameters, trains it one step with DeepSpeed
ZeRO-1, -2 and -3 on 2 ranks (torchrun, gloo, CPU) and saves each checkpoint; then runs each converter
in its own child process, interleaved, and reads that child's wall time, peak RSS (ru_maxrss from
wait4) and peak anonymous RSS (RssAnon, sampled). ftpipe and DeepSpeed's lazy_mode feed the same
safetensors writer, so those two differ only in the reader. Outputs are compared tensor by tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts run from benchmarks/ have it first on sys.path, where tokenize.py would shadow the
# standard library's tokenize module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import threading
import time

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
STAGES = (1, 2, 3)
OURS, LAZY, SCRIPT = "ftpipe", "deepspeed-lazy", "zero_to_fp32"
CONVERTERS = {OURS: "ftpipe reader + ftpipe writer",
              LAZY: "DeepSpeed lazy_mode + ftpipe writer",
              SCRIPT: "zero_to_fp32.py --safe_serialization"}
IMPORTS = {"torch": "(reference) import torch, nothing read",
           "deepspeed": "(reference) import torch + deepspeed.utils.zero_to_fp32, nothing read"}
KEYS = ("seconds", "work_seconds", "peak_rss_mib", "peak_anon_mib")
WORK_MARK = "work seconds after imports: "
TARGETS = {SCRIPT: {"seconds": 0.8, "peak_rss_mib": 0.6}}  # ftpipe / baseline, all stages
KEEP_BELOW = 0.85  # the rule: keep ours only where > 15% better than DeepSpeed's API
LLAMA = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
             tie_word_embeddings=False)


def make_checkpoints(out: Path) -> None:
    """torchrun worker: one step per ZeRO stage on the same random Llama, saved under out/zero{N}/."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    dist.init_process_group("gloo")
    for stage in STAGES:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        ids = torch.randint(0, LLAMA["vocab_size"], (1, 16))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        folder = out / f"zero{stage}"
        engine.save_checkpoint(str(folder), tag="deepspeed")
        if dist.get_rank() == 0:
            (folder / "parameters.txt").write_text(str(parameters))
            (folder / "meta.json").write_text(json.dumps({"format": "deepspeed", "world_size": 2}))
        dist.barrier()
        del engine, model, optimizer
    dist.destroy_process_group()


def convert(name: str, checkpoint: Path, out: Path) -> None:
    """One measured child: read `checkpoint` with converter `name`, write safetensors to `out`."""
    sys.path.insert(0, str(REPO))
    from pipeline.hf_writer import write_weights

    if name == OURS:
        from pipeline.checkpoint_readers import open_checkpoint

        start = time.perf_counter()
        write_weights(out, open_checkpoint(checkpoint).items())
    elif name == LAZY:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        start = time.perf_counter()
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="deepspeed", lazy_mode=True)
        # Popped as written, as DeepSpeed's own converter does, so nothing is held longer than needed.
        write_weights(out, ((key, lazy.pop(key).contiguous()) for key in list(lazy)))
    print(f"{WORK_MARK}{time.perf_counter() - start:.4f}", flush=True)


def _anon_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^RssAnon:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else 0.0


def measure(command: list[str]) -> dict[str, float]:
    """Wall seconds, peak RSS and sampled peak anonymous RSS (MiB) of one child process.

    ru_maxrss counts mapped file pages too, which the kernel can drop under pressure; RssAnon is the
    part that cannot be reclaimed without swap (sampled every 10 ms, so it can miss a short spike).
    """
    start = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    anon, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            anon[0] = max(anon[0], _anon_mib(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = child.stdout.read().decode()  # also keeps a chatty child from blocking on a full pipe
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed: {output[-2000:]}")
    work = re.search(re.escape(WORK_MARK) + r"([\d.]+)", output)
    return {"seconds": seconds, "work_seconds": float(work.group(1)) if work else math.nan,
            "peak_rss_mib": usage.ru_maxrss / 1024, "peak_anon_mib": anon[0]}


def command(name: str, checkpoint: Path, out: Path) -> list[str]:
    if name == SCRIPT:
        return [sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(out),
                "--safe_serialization", "-t", "deepspeed"]
    return [sys.executable, __file__, "--convert", name, str(checkpoint), str(out)]


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                out.update(dict.fromkeys(handle.keys(), path))
        return out

    left, right = files(a), files(b)
    if left.keys() != right.keys():
        return False
    for key in left:
        with safe_open(str(left[key]), "pt") as x, safe_open(str(right[key]), "pt") as y:
            if not torch.equal(x.get_tensor(key), y.get_tensor(key)):
                return False
    return True


def warm_page_cache(folder: Path) -> None:
    # Every converter then reads from memory: the comparison is of the work, not of the disk.
    for path in folder.rglob("*.pt"):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def ensure_checkpoints(workdir: Path) -> None:
    if not all((workdir / f"zero{s}" / "meta.json").is_file() for s in STAGES):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--make-checkpoints", str(workdir)], env=env, check=True)


def benchmark(workdir: Path, repeats: int) -> dict:
    ensure_checkpoints(workdir)
    runs: dict[tuple, list[dict]] = {}
    imports = {"torch": "import torch", "deepspeed": "import torch, deepspeed.utils.zero_to_fp32"}
    for repeat in range(repeats):
        for name, code in imports.items():
            runs.setdefault((name, "-"), []).append(measure([sys.executable, "-c", code]))
        for stage in STAGES:
            checkpoint = workdir / f"zero{stage}"
            names = list(CONVERTERS)
            names = names[repeat % len(names):] + names[:repeat % len(names)]  # rotate who goes first
            for name in names:
                out = workdir / f"out-{stage}-{name}"
                shutil.rmtree(out, ignore_errors=True)
                warm_page_cache(checkpoint)
                os.sync()  # no run starts behind another's dirty pages (writeback throttles writers)
                runs.setdefault((name, stage), []).append(measure(command(name, checkpoint, out)))
    zero3 = workdir / "zero3"
    return {"parameters": int((zero3 / "parameters.txt").read_text()), "repeats": repeats,
            "checkpoint_mib": {s: sum(p.stat().st_size for p in (workdir / f"zero{s}").rglob("*.pt")) / 2**20
                               for s in STAGES},
            "runs": {key: {k: statistics.median(r[k] for r in rs) for k in KEYS} for key, rs in runs.items()},
            "identical": {(s, name): same_weights(workdir / f"out-{s}-{OURS}", workdir / f"out-{s}-{name}")
                          for s in STAGES for name in (LAZY, SCRIPT)}}


def table(report: dict) -> str:
    runs = report["runs"]
    sizes = ", ".join(f"ZeRO-{s} {m:.0f}" for s, m in report["checkpoint_mib"].items())
    lines = [f"2-rank checkpoints of a random-init Llama, {report['parameters'] / 1e6:.1f}M parameters, fp32 "
             f"(MiB of .pt files: {sizes}); CPU, page cache warm; medians of {report['repeats']} interleaved "
             "runs. Each run is a fresh process: wall s includes its imports, work s is the reading and "
             "writing after them.", "",
             "| ZeRO | converter | wall s | work s | peak RSS MiB | peak anon MiB | output = ftpipe's |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        for name, label in CONVERTERS.items():
            same = "-" if name == OURS else ("yes" if report["identical"][(stage, name)] else "NO")
            lines.append(_row(stage, label, runs[(name, stage)], same))
    lines += [_row("-", label, runs[(name, "-")], "-") for name, label in IMPORTS.items()]
    lines += ["",
              "| ZeRO | ratio ftpipe / | wall s | work s | peak RSS | peak anon | rule |",
              "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        for name in (LAZY, SCRIPT):
            ratios = {k: runs[(OURS, stage)][k] / runs[(name, stage)][k] for k in KEYS}
            lines.append(f"| {stage} | {name} | " + " | ".join(_num(ratios[k], ".2f", "x") for k in KEYS)
                         + f" | {verdict(name, ratios)} |")
    return "\n".join(lines) + "\n"


def _row(stage: object, label: str, row: dict, same: str) -> str:
    cells = [_num(row[k], spec) for k, spec in zip(KEYS, (".2f", ".2f", ".0f", ".0f"))]
    return f"| {stage} | {label} | {' | '.join(cells)} | {same} |"


def _num(value: float, spec: str, unit: str = "") -> str:
    return "-" if math.isnan(value) else f"{value:{spec}}{unit}"


def verdict(name: str, ratios: dict[str, float]) -> str:
    if name == LAZY:
        better = ratios["seconds"] < KEEP_BELOW or ratios["peak_rss_mib"] < KEEP_BELOW
        return f"> 15% better (< {KEEP_BELOW}x in wall s or peak RSS): {'yes, keep ours' if better else 'NO'}"
    targets = TARGETS[name]
    met = all(ratios[k] <= t for k, t in targets.items())
    return " and ".join(f"{k} <= {t}x" for k, t in targets.items()) + f": {'met' if met else 'NOT met'}"


SECTION = """## consolidate

Measured by `python benchmarks/consolidate.py --repeats 5 --write-docs`. How each converter reads a DeepSpeed
checkpoint (from their code):

- ftpipe's reader memory-maps the optimizer files without importing DeepSpeed (its classes in the pickles
  are stood in for), pages in only the fp32 partitions of one parameter at a time (one `MADV_POPULATE_READ`
  call per piece instead of a page fault per page) and drops those pages from its resident set once
  copied, and the writer streams each tensor straight into the shard file.
- DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)` imports DeepSpeed, loads the
  model-state files whole (for ZeRO-1/2 they hold the full module), and memory-maps the optimizer files.
  Only ZeRO-3 trainable parameters are lazy (`GatheredTensor`, gathered on `.contiguous()`); the mapped
  pages it touches stay resident. For ZeRO-1/2 it concatenates every rank's fp32 partition into one full
  fp32 vector up front, and for ZeRO-3 it gathers frozen parameters (a LoRA base model) eagerly.
- zero_to_fp32.py uses the same reading code, then builds each shard (5 GB by default, here the whole
  model) in memory and serializes it through a bytes copy.

Peak RSS counts mapped file pages (reclaimable); peak anon is the part that is not. Absolute times on a
shared 2-core machine move with other load; the ratios are what to compare.

"""


def write_docs(text: str) -> None:
    """Replace (or append) only the generated part of docs/benchmarks.md's '## consolidate' section.

    The hand-written decision ('### Decision' up to the next '## ') is kept as it is.
    """
    current = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    pattern = re.compile(r"^## consolidate\n.*?(?=^### Decision\n|^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: SECTION + text + "\n", current, count=1).rstrip() + "\n"
    else:
        updated = current.rstrip() + "\n\n" + SECTION + text
    DOCS.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftpipe-bench-consolidate"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--make-checkpoints", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoints:
        return make_checkpoints(args.make_checkpoints)
    if args.convert:
        name, checkpoint, out = args.convert
        return convert(name, Path(checkpoint), Path(out))
    text = table(benchmark(args.workdir, args.repeats))
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
