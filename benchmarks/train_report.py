"""Figures of benchmarks/train.py: the matmul peak at the model's own shapes, steady-state tokens/s,
MFU, and the markdown table with the targets.

The peak: every matrix product of one training step of one transformer layer and of the vocabulary
head, at tokens = micro_batch x max_len, each timed as autograd runs it for a Linear (forward x @ W^T,
input gradient dy @ W, weight gradient dy^T @ x), best of a few timings; the peak is their FLOPs over
their time, the layer's products weighted by the number of layers. It is probed before and after the
trainers and the higher counts: this machine's speed drifts, and a peak probed in a slow minute would
flatter every MFU. MFU = 6 N tokens/s / peak (N: the trainable parameters); attention's products (QK^T,
AV: 6 x layers x heads x head_dim x n(n+1) per example of n tokens, causal, forward + backward) are a
separate column against the same peak.

The padded Trainer's step costs the same whatever its rows hold, so its tokens/s over a few steps moves with
the rows they drew; the report sets it beside its rate at its whole dataset's mean row (the targets use what
it drew).
"""

from __future__ import annotations

import time
from typing import Any

TARGETS = {"trl": 2.5, "padded": 15.0, "mfu": 0.8}
NAMES = {"ftpipe": "ftpipe (train stage, packed)", "trl": "TRL SFTTrainer (packing)",
         "padded": "HF Trainer (pad to max_length)"}
SMALL_PRODUCT_S, MAX_TIMINGS = 0.1, 100
PROBE_BUDGET_S = 60.0  # a CPU that emulates bf16 would take many minutes at full size: fewer tokens then


def model_shape(config: dict[str, Any]) -> dict[str, int]:
    """The sizes the products and attention's FLOPs need, from a causal LM's config.json."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
            "layers": config["num_hidden_layers"], "q_width": heads * head_dim,
            "kv_width": config.get("num_key_value_heads", heads) * head_dim, "vocab": config["vocab_size"]}


def linears(shape: dict[str, int]) -> list[tuple[int, int, int]]:
    """(fan_in, fan_out, how many per model) of q, k, v, o, gate, up, down and the head."""
    h, layers = shape["hidden"], shape["layers"]
    per_layer = [(h, shape["q_width"]), (h, shape["kv_width"]), (h, shape["kv_width"]),
                 (shape["q_width"], h), (h, shape["intermediate"]), (h, shape["intermediate"]),
                 (shape["intermediate"], h)]
    return [(i, o, layers) for i, o in per_layer] + [(h, shape["vocab"], 1)]


def time_linear(fan_in: int, fan_out: int, tokens: int, dtype, repeats: int) -> tuple[float, float]:
    """(FLOPs, best seconds) of one Linear's three products in a training step: the best of at least
    `repeats` timings after a warm-up, more for small products (up to SMALL_PRODUCT_S of them), whose
    timings a busy machine disturbs most."""
    import torch

    x, dy = torch.randn(tokens, fan_in, dtype=dtype), torch.randn(tokens, fan_out, dtype=dtype)
    weight = torch.randn(fan_out, fan_in, dtype=dtype)
    best, spent, timings = float("inf"), 0.0, 0
    while timings <= repeats or (spent < SMALL_PRODUCT_S and timings < MAX_TIMINGS):
        started = time.perf_counter()
        x @ weight.t()
        dy @ weight
        dy.t() @ x
        took = time.perf_counter() - started
        best = best if timings == 0 else min(best, took)  # the first is a warm-up
        spent, timings = spent + took, timings + 1
    return 3 * 2.0 * tokens * fan_in * fan_out, best


def probe_tokens(shape: dict[str, int], tokens: int, dtype, repeats: int) -> int:
    """`tokens`, halved until the whole probe would fit PROBE_BUDGET_S at a small product's speed."""
    flops, seconds = time_linear(512, 512, 512, dtype, 1)
    total = sum(3 * 2.0 * fan_in * fan_out for fan_in, fan_out, _ in linears(shape))
    while tokens > 64 and total * tokens * (repeats + 1) / (flops / seconds) > PROBE_BUDGET_S:
        tokens //= 2
    return tokens


def matmul_peak(shape: dict[str, int], tokens: int, precision: str, repeats: int = 2) -> dict[str, Any]:
    """FLOP/s of the model's own products (each Linear counted as often as the model has it), with the
    allocator settings ftpipe trains with on the CPU (pipeline/host_memory.py): a peak that paid page
    faults for each product's output would be too low and flatter every MFU."""
    import torch

    from pipeline.host_memory import keep_freed_memory

    keep_freed_memory()

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    used = probe_tokens(shape, tokens, dtype, repeats)
    flops = seconds = 0.0
    for fan_in, fan_out, count in linears(shape):
        work, best = time_linear(fan_in, fan_out, used, dtype, repeats)
        flops, seconds = flops + count * work, seconds + count * best
    return {"flops_per_second": flops / seconds, "tokens": used, "precision": precision,
            "threads": torch.get_num_threads()}


def higher_peak(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The higher of the peaks probed before and after the trainers, with both kept."""
    probes = [before["flops_per_second"], after["flops_per_second"]]
    return {**max(before, after, key=lambda peak: peak["flops_per_second"]), "probes": probes}


def figures(record: dict[str, Any], warmup: int, shape: dict[str, int], peak: float) -> dict[str, Any]:
    """Steady-state rates of one trainer: the steps after `warmup`."""
    steady = record["steps"][warmup:]
    seconds = sum(s["seconds"] for s in steady)
    tokens = sum(s["tokens"] for s in steady)
    attention = 6 * shape["layers"] * shape["q_width"] * sum(s["attention"] for s in steady)
    rate = tokens / seconds
    rates = {"tokens_per_second": rate, "steady_steps": len(steady), "step_seconds": seconds / len(steady),
             "tokens_per_step": tokens / len(steady), "mfu": 6 * record["parameters"] * rate / peak,
             "attention_mfu": attention / seconds / peak, "first_losses": record["losses"][:3]}
    if "mean_step_tokens" in record:  # the padded Trainer: its rate at the whole dataset's mean row
        rates["mean_step_tokens"] = record["mean_step_tokens"]
        rates["tokens_per_second_at_mean_rows"] = record["mean_step_tokens"] / rates["step_seconds"]
    return rates


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ftpipe = results["ftpipe"]["tokens_per_second"]
    rows = [{"what": f"ftpipe / {NAMES[k]}", "value": ftpipe / results[k]["tokens_per_second"],
             "target": TARGETS[k]} for k in ("trl", "padded")]
    rows.append({"what": "ftpipe MFU", "value": results["ftpipe"]["mfu"], "target": TARGETS["mfu"]})
    return [{**row, "met": row["value"] >= row["target"]} for row in rows]


def _losses(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    trl = results["trl"]["tokens_per_second"]
    lines = ["| trainer | real tokens/s | vs TRL | MFU (6N) | attention MFU | peak RSS MiB | first losses |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for key, r in results.items():
        lines.append(f"| {NAMES[key]} | {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / trl:.2f}x | "
                     f"{r['mfu']:.3f} | {r['attention_mfu']:.3f} | {r['peak_rss_mib']:.0f} | "
                     f"{_losses(r['first_losses'])} |")
    return lines


def heading(report: dict[str, Any]) -> str:
    peak, run = report["peak"], report["settings"]
    return (f"{run['model']}: {report['parameters'] / 1e6:.1f}M trainable parameters, "
            f"max_len {run['max_len']}, micro batch {run['micro_batch']}, {run['precision']}, "
            f"{run['steps']} steps of which the first {run['warmup']} left out; matmul peak "
            f"{peak['flops_per_second'] / 1e9:.1f} GFLOP/s at the model's shapes (probed before and after "
            f"the trainers: {' and '.join(f'{p / 1e9:.1f}' for p in peak['probes'])}; "
            f"{peak['tokens']} tokens, {peak['threads']} threads); each peak RSS includes the "
            f"{report['imports_rss_mib']:.0f} MiB of libraries imported before the trainers were forked")


def rows_drawn(results: dict[str, dict[str, Any]]) -> list[str]:
    """What the padded Trainer's few steps drew against its whole dataset (the targets use what it drew)."""
    padded, ftpipe = results["padded"], results["ftpipe"]["tokens_per_second"]
    at_mean = padded.get("tokens_per_second_at_mean_rows")
    if at_mean is None:
        return []
    return ["", f"{NAMES['padded']}: its measured steps held {padded['tokens_per_step']:.0f} real tokens a "
                f"step, its dataset's rows {padded['mean_step_tokens']:.0f} a step on average; at that mean "
                f"it would train {at_mean:.1f} tokens/s (ftpipe / that: {ftpipe / at_mean:.2f}x)"]


def markdown(report: dict[str, Any]) -> str:
    goals = [f"- {t['what']}: {t['value']:.2f} (target >= {t['target']}): {'met' if t['met'] else 'missed'}"
             for t in report["targets"]]
    return "\n".join([heading(report), "", *table(report["results"]), *rows_drawn(report["results"]), "",
                      "Targets:", *goals]) + "\n"
