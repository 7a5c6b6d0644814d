"""Figures of the GPU check (benchmarks/gpu.py): FLOPs, step times, MFU, and the markdown report.

FLOPs per trained token: 6 x the parameters that take part in matrix products (every Linear, the
tied lm_head included; the embedding lookup is no product). Attention's own products (QK^T and AV)
are counted apart, exactly from the example lengths of the rows each step trained: causal and per
example (packed examples do not attend to each other), 2 x h x n(n+1) per layer forward for an
example of n tokens and h = heads x head_dim, x3 for forward + backward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WARMUP_STEPS = 3  # steps left out of the steady-state figures (CUDA and kernel warm-up, compilation)
TARGET_MFU = 0.40


def model_shape(model) -> dict[str, Any]:
    import torch

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"parameters": sum(p.numel() for p in model.parameters()), "matmul_parameters": linear,
            "layers": config.num_hidden_layers, "attention_width": config.num_attention_heads * head_dim,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}


def step_work(run_dir, spec: dict[str, Any]) -> list[dict[str, float]]:
    """Per optimizer step: the tokens the loop counted and sum(n(n+1)) over its examples, from the
    rows the loop's own sampler gave that step (one rank, grad_accum 1), and its seconds, from the
    loop's cumulative tokens/s in train/metrics.jsonl."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.tokenized import open_split
    from pipeline.train.data import SampleOrder

    table = open_split(run_dir.stage("tokenize") / "train")
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    examples = (table.column("seq_lens").to_pylist() if "seq_lens" in table.column_names
                else [[int(n)] for n in lengths])
    quadratic = np.array([sum(n * (n + 1) for n in lens) for lens in examples], dtype=np.float64)
    order = SampleOrder(table.num_rows, seed=0)
    metrics = (run_dir.stage("train") / "metrics.jsonl").read_text().splitlines()
    steps, tokens, seconds = [], 0, 0.0
    for record in map(json.loads, metrics):
        rows = order.rows(record["samples"] - spec["micro_batch"], spec["micro_batch"])
        tokens += int(lengths[rows].sum())
        total_seconds = tokens / record["tokens_per_second"]  # the loop's own clock, summed over steps
        steps.append({"tokens": float(lengths[rows].sum()), "quadratic": float(quadratic[rows].sum()),
                      "seconds": total_seconds - seconds, "loss": record["loss"]})
        seconds = total_seconds
    return steps


def train_figures(run_dir, spec: dict[str, Any]) -> dict[str, Any]:
    """Steady-state tokens/s and FLOP rates of one train run (MFU is added against the peak later)."""
    steps = step_work(run_dir, spec)
    steady = steps[WARMUP_STEPS:] if len(steps) > WARMUP_STEPS + 1 else steps[1:] or steps
    seconds = sum(s["seconds"] for s in steady)
    tokens = sum(s["tokens"] for s in steady)
    shape = spec["shape"]
    model_flops = 6 * shape["matmul_parameters"] * tokens
    attention_flops = 6 * shape["layers"] * shape["attention_width"] * sum(s["quadratic"] for s in steady)
    return {"steps": len(steps), "steady_steps": len(steady), "tokens_per_step": tokens / len(steady),
            "tokens_per_second": tokens / seconds, "step_seconds": seconds / len(steady),
            "slowest_steady_step_seconds": max(s["seconds"] for s in steady),
            "first_step_seconds": steps[0]["seconds"], "final_loss": steps[-1]["loss"],
            "model_flops_per_second": model_flops / seconds,
            "attention_flops_per_second": attention_flops / seconds,
            "attention_share": attention_flops / (model_flops + attention_flops),
            "tokens_derived": sum(s["tokens"] for s in steps), **_manifest_figures(run_dir)}


def _manifest_figures(run_dir) -> dict[str, Any]:
    """The stages' own figures: tokens_trained is the loop's count, which tokens_derived must equal."""
    train = json.loads((run_dir.stage("train") / "manifest.json").read_text())
    packing = json.loads((run_dir.stage("tokenize") / "manifest.json").read_text())["splits"]["train"]
    return {"tokens_trained": train["tokens_trained"], "loop_tokens_per_second": train["tokens_per_second"],
            "train_stage_seconds": train["wall_seconds"], "examples_per_row": packing["examples_per_row"],
            "packing_efficiency": packing["packing_efficiency"]}


def add_mfu(result: dict[str, Any], peak: float) -> None:
    """MFU of the matrix products alone (6N) and with attention's, against the measured peak."""
    if "model_flops_per_second" not in result:
        return
    result["mfu_6n"] = result["model_flops_per_second"] / peak
    result["mfu"] = (result["model_flops_per_second"] + result["attention_flops_per_second"]) / peak


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def train_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | attention | strategy | packed | tokens/s | step ms | slowest step ms | MFU (6N) | "
             "MFU (6N + attn) | attn share | peak alloc GiB | peak reserved GiB | first step s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = run.get("result", {})
        status = run.get("error") or "ok"
        lines.append(
            f"| {run['name']} | {run['attn']} | {run['strategy']} | {'yes' if run['packed'] else 'no'} | "
            f"{_cell(r.get('tokens_per_second'), 0)} | {_cell(_ms(r.get('step_seconds')), 1)} | "
            f"{_cell(_ms(r.get('slowest_steady_step_seconds')), 1)} | "
            f"{_pct(r.get('mfu_6n'))} | {_pct(r.get('mfu'))} | {_pct(r.get('attention_share'))} | "
            f"{_cell(r.get('peak_allocated_gib'))} | {_cell(r.get('peak_reserved_gib'))} | "
            f"{_cell(r.get('first_step_seconds'))} | {status} |"
        )
    return lines


def _packing(runs: list[dict[str, Any]]) -> str:
    done = [r["result"] for r in runs if "result" in r]
    if not done:
        return ""
    return (f"Packing: {done[0]['examples_per_row']:.2f} examples per row, "
            f"{done[0]['packing_efficiency']:.1%} of the row positions are real tokens; "
            f"{done[0]['tokens_per_step']:,.0f} tokens per step.")


def _warmup(runs: list[dict[str, Any]]) -> str:
    done = [r["result"] for r in runs if "result" in r]
    return str(done[0]["steps"] - done[0]["steady_steps"]) if done else "-"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def loss_table(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["| attention | precision | packed loss | unpacked loss | relative difference | tolerance | "
             "equal |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        if "error" in c:
            lines.append(f"| {c['attn']} | {c['precision']} | - | - | - | - | error: {c['error']} |")
            continue
        lines.append(
            f"| {c['attn']} | {c['precision']} | {c['packed_loss']:.6f} | {c['unpacked_loss']:.6f} | "
            f"{c['relative_difference']:.2e} | {c['tolerance']:.0e} | {'yes' if c['equal'] else 'NO'} |"
        )
    return lines


def target_line(runs: list[dict[str, Any]], packed_len: int) -> str:
    scored = [r for r in runs if r.get("packed") and r.get("result", {}).get("mfu") is not None]
    if not scored:
        return f"Target MFU >= {TARGET_MFU:.0%} at L={packed_len} packed: no packed run finished."
    best = max(scored, key=lambda r: r["result"]["mfu"])
    mfu = best["result"]["mfu"]
    return (f"Target MFU (6N + attention) >= {TARGET_MFU:.0%} at L={packed_len} packed: best {best['name']} "
            f"{mfu:.1%} = {mfu / TARGET_MFU:.2f}x the target ({'met' if mfu >= TARGET_MFU else 'not met'}).")


def markdown(report: dict[str, Any]) -> str:
    env, shape, peak = report["environment"], report["model"], report["peak"]
    lines = [f"GPU check ({report['mode']}): {env.get('device_name')}, torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}; model {shape['parameters'] / 1e6:.1f}M parameters "
             f"({shape['matmul_parameters'] / 1e6:.1f}M in matrix products), L={report['max_len']}, "
             f"micro-batch {report['micro_batch']}, {report['steps']} steps (figures leave out the first "
             f"{_warmup(report['runs'])}).", "",
             f"Peak: {peak['dtype']} {peak['size']}^3 matmul, best of 5: "
             f"{peak['flops_per_second'] / 1e12:.4g} TFLOP/s.", "",
             *train_table(report["runs"]), "", _packing(report["runs"]), "",
             target_line(report["runs"], report["max_len"]), ""]
    if report.get("loss_checks"):
        lines += ["Packed vs unpacked, the same examples through the loop's objective (mean loss per "
                  "target):", "", *loss_table(report["loss_checks"]), ""]
    for run in report["runs"]:
        evaluation = run.get("result", {}).get("evaluate")
        if evaluation:
            lines += [f"Evaluate ({run['name']}): on {evaluation['device']}, {evaluation['seconds']} s, loss "
                      f"{evaluation['loss']:.4f} over {evaluation['eval_tokens']} tokens, peak allocated "
                      f"{_cell(evaluation['peak_allocated_gib'])} GiB.", ""]
    lines += ["Seconds: " + ", ".join(f"{k} {v}" for k, v in report.get("timings", {}).items()), ""]
    if report.get("problems"):
        lines += ["Problems:", "", *[f"- {p}" for p in report["problems"]], ""]
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
