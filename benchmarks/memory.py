"""Per-rank memory of DDP, ZeRO-2, ZeRO-3 and FSDP2 with 2 ranks on a >= 100M-parameter model.

    python benchmarks/memory.py [--hidden 768 --layers 12] [--strategies ddp,zero2,zero3,fsdp]

Each strategy trains a few steps of a random-init Llama under torchrun (2 ranks, gloo, CPU)
through ftpipe's own engines. Per rank it reports
  model state: bytes of every live tensor storage just before an optimizer step (parameters,
               gradients, optimizer state, flat buffers), found by walking the heap, and
  peak RSS:    the process high-water mark minus its RSS before the model was built,
next to the ZeRO paper's model-state formula for mixed-precision Adam (16 bytes/param): DDP 16P,
ZeRO-2 4P + 12P/N, ZeRO-3 and FSDP 16P/N. DDP and FSDP keep fp32 weights and use bf16 compute
(4 weights + 4 gradients + 8 Adam moments = 16); DeepSpeed keeps bf16 weights and gradients
and an fp32 master copy (2 + 2 + 12 = 16).
Target: ZeRO-3 and FSDP2 model state <= 0.55x DDP's.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGY_TRAIN = {
    "ddp": {"strategy": "ddp"},
    "zero2": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}},
    "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}},
    "fsdp": {"strategy": "fsdp"},
}
FORMULA = {"ddp": lambda p, n: 16 * p, "zero2": lambda p, n: 4 * p + 12 * p / n,
           "zero3": lambda p, n: 16 * p / n, "fsdp": lambda p, n: 16 * p / n}
TARGET = 0.55
STEPS, SEQ, MICRO = 2, 16, 1  # step 1 creates the optimizer state; step 2 is measured


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensor_bytes() -> int:
    """Bytes of distinct CPU tensor storages alive in this process (meta tensors excluded)."""
    import torch

    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    # .grad lives in autograd's C++ side, invisible to gc: add it explicitly.
    tensors += [t.grad for t in tensors if t.grad is not None]
    for tensor in tensors:
        try:
            if tensor.is_meta:
                continue
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            storage = local.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access
            continue
    return sum(seen.values())


def make_model(folder: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def worker(strategy: str, model_dir: str, out: str, precision: str) -> None:
    import torch

    from pipeline import distributed
    from pipeline.config import validate_config
    from pipeline.train.build import build_engine

    cfg = validate_config({"name": "mem", "model": {"name_or_path": model_dir}, "data": {"train": ["x"]},
                           "train": {**STRATEGY_TRAIN[strategy], "micro_batch_size": MICRO, "lr": 1e-5,
                                     "precision": precision}})
    dist = distributed.init(need_group=True)
    gc.collect()
    before = rss_bytes()
    engine = build_engine(cfg, dist)
    state_bytes = 0
    for step in range(STEPS):
        ids = torch.randint(0, 32000, (MICRO, SEQ), generator=torch.Generator().manual_seed(step))
        with engine.autocast():
            loss = engine.model(input_ids=ids, labels=ids).loss / dist.world_size
        engine.backward(loss)
        if step == STEPS - 1:
            gc.collect()
            state_bytes = live_tensor_bytes()
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    Path(out).with_suffix(f".rank{dist.rank}.json").write_text(json.dumps(
        {"rank": dist.rank, "state_bytes": state_bytes, "peak_rss_delta": peak}))
    distributed.barrier()
    distributed.shutdown()


def measure(strategy: str, model_dir: Path, scratch: Path, precision: str) -> list[dict]:
    out = scratch / strategy
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           __file__, "--worker", strategy, str(model_dir), str(out), precision]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]


def report(results: dict[str, list[dict]], params: int, precision: str) -> None:
    gib = 1024 ** 3
    print(f"model: random-init Llama, {params / 1e6:.1f}M parameters; 2 ranks; AdamW; precision {precision}")
    print(f"{'strategy':<8}{'formula GiB':>12}{'state r0':>10}{'state r1':>10}{'peak RSS r0':>13}"
          f"{'peak RSS r1':>13}{'state/DDP':>11}")
    ddp = max(r["state_bytes"] for r in results["ddp"]) if "ddp" in results else None
    for name, ranks in results.items():
        state = max(r["state_bytes"] for r in ranks)
        ratio = f"{state / ddp:>11.2f}" if ddp else ""
        print(f"{name:<8}{FORMULA[name](params, 2) / gib:>12.2f}"
              + "".join(f"{r['state_bytes'] / gib:>10.2f}" for r in ranks)
              + "".join(f"{r['peak_rss_delta'] / gib:>13.2f}" for r in ranks) + ratio)
    for name in ("zero3", "fsdp"):
        if ddp and name in results:
            ratio = max(r["state_bytes"] for r in results[name]) / ddp
            verdict = "meets" if ratio <= TARGET else "MISSES"
            print(f"{name}: model state {ratio:.2f}x DDP's ({verdict} the <= {TARGET}x target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--strategies", default="ddp,zero2,zero3,fsdp")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                        help="bf16 (the formula's mixed precision) or fp32, where DeepSpeed keeps a "
                             "separate fp32 master copy beside the fp32 module: 20P/N for ZeRO-3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        params = make_model(model_dir, args.hidden, args.layers)
        results = {name: measure(name, model_dir, Path(scratch), args.precision)
                   for name in args.strategies.split(",")}
    report(results, params, args.precision)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
    else:
        main()
