"""Consolidating a 2-rank ZeRO-3 checkpoint: ftpipe's streaming reader + writer vs DeepSpeed's
zero_to_fp32.py (--safe_serialization), same checkpoint, same machine.

    python benchmarks/consolidate.py [--workdir DIR] [--repeats 2] [--write-docs]

Builds (once, kept in DIR) a random-init Llama of ~125M parameters, trains it one step with
DeepSpeed ZeRO-3 on 2 ranks (torchrun, gloo, CPU) and saves the checkpoint; then runs each
converter in its own child process and reads that child's wall time and peak RSS (ru_maxrss from
wait4). Outputs are compared tensor by tensor. Targets: time <= 0.8x and RSS <= 0.6x the baseline.
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
import re
import shutil
import subprocess
import time

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
TARGETS = {"seconds": 0.8, "peak_rss_mib": 0.6}
LLAMA = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512,
             tie_word_embeddings=False)


def make_checkpoint(out: Path) -> None:
    """torchrun worker: one ZeRO-3 step on a random Llama, checkpoint saved under out/."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=config)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(out), tag="deepspeed")
    if dist.get_rank() == 0:
        (out / "meta.json").write_text(json.dumps({"format": "deepspeed", "world_size": 2}))
        (out / "parameters.txt").write_text(str(sum(p.ds_numel for p in model.parameters())))
    dist.barrier()
    dist.destroy_process_group()


def run_ftpipe(checkpoint: Path, out: Path) -> None:
    """The measured ftpipe path: stream the checkpoint into safetensors shards."""
    sys.path.insert(0, str(REPO))
    from pipeline.checkpoint_readers import open_checkpoint
    from pipeline.hf_writer import write_weights

    write_weights(out, open_checkpoint(checkpoint).items())


def measure(command: list[str], env: dict | None = None) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, **(env or {})},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed: {child.stderr.read().decode()[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def commands(checkpoint: Path, out: Path) -> dict[str, list[str]]:
    return {
        "ftpipe (streaming reader + writer)": [sys.executable, __file__, "--ftpipe", str(checkpoint), str(out)],
        "zero_to_fp32.py --safe_serialization": [
            sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(out),
            "--safe_serialization", "-t", "deepspeed"],
    }


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def tensors(folder: Path):
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    yield key, path, handle.get_slice(key)

    left = {k: p for k, p, _ in tensors(a)}
    right = {k: p for k, p, _ in tensors(b)}
    if left.keys() != right.keys():
        return False
    for key in left:
        with safe_open(str(left[key]), "pt") as x, safe_open(str(right[key]), "pt") as y:
            if not torch.equal(x.get_tensor(key), y.get_tensor(key)):
                return False
    return True


def warm_page_cache(folder: Path) -> None:
    # Both converters then read from memory: the comparison is of the work, not of the disk.
    for path in folder.rglob("*.pt"):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def benchmark(workdir: Path, repeats: int) -> dict:
    checkpoint = workdir / "zero3"
    if not (checkpoint / "meta.json").is_file():
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--make-checkpoint", str(checkpoint)], env=env, check=True)
    results: dict[str, list[dict]] = {}
    outputs = {name: workdir / f"out-{i}" for i, name in enumerate(commands(checkpoint, workdir))}
    for _ in range(repeats):
        for name, out in outputs.items():
            shutil.rmtree(out, ignore_errors=True)
            warm_page_cache(checkpoint)
            results.setdefault(name, []).append(measure(commands(checkpoint, out)[name], {"DS_ACCELERATOR": "cpu"}))
    ours, baseline = outputs.values()
    return {"parameters": int((checkpoint / "parameters.txt").read_text()),
            "checkpoint_mib": sum(p.stat().st_size for p in checkpoint.rglob("*.pt")) / 2**20,
            "runs": {n: best(r) for n, r in results.items()}, "identical_output": same_weights(ours, baseline)}


def best(runs: list[dict]) -> dict:
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def table(report: dict) -> str:
    (ours_name, ours), (base_name, base) = report["runs"].items()
    lines = [f"2-rank ZeRO-3 checkpoint of a random-init Llama, {report['parameters'] / 1e6:.1f}M parameters "
             f"({report['checkpoint_mib']:.0f} MiB of .pt files); CPU, page cache warm; best time and "
             f"highest peak RSS of the runs.", "",
             "| converter | wall s | peak RSS MiB |", "|---|---|---|"]
    for name, row in report["runs"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['peak_rss_mib']:.0f} |")
    lines += ["", f"| ratio (ftpipe / {base_name.split()[0]}) | measured | target | met |", "|---|---|---|---|"]
    for key, target in TARGETS.items():
        ratio = ours[key] / base[key]
        lines.append(f"| {key} | {ratio:.2f}x | <= {target}x | {'yes' if ratio <= target else 'NO'} |")
    lines += ["", f"Outputs identical tensor for tensor: {'yes' if report['identical_output'] else 'NO'}."]
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    """Replace (or append) only the '## consolidate' section of docs/benchmarks.md."""
    section = ("## consolidate\n\nMeasured by `python benchmarks/consolidate.py --write-docs`. ftpipe memory-maps "
               "the optimizer files, pages in only the fp32 partitions of one parameter at a time (and "
               "drops them once copied) and streams each tensor straight into the shard file; "
               "zero_to_fp32 builds each shard (5 GB by default, here the whole model) in memory and "
               "serializes it through a bytes copy, and imports DeepSpeed. Absolute times on a shared "
               "2-core machine move with other load; the ratios are what to compare.\n\n" + text)
    current = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    pattern = re.compile(r"^## consolidate\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: section + "\n", current).rstrip() + "\n"
    else:
        updated = current.rstrip() + "\n\n" + section
    DOCS.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftpipe-bench-consolidate"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ftpipe", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        return make_checkpoint(args.make_checkpoint)
    if args.ftpipe:
        return run_ftpipe(*args.ftpipe)
    text = table(benchmark(args.workdir, args.repeats))
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
