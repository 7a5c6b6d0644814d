"""The run's pictures, drawn from what its stages wrote (nothing is recomputed): training curves,
the confusion matrix, token lengths per split, packing efficiency, and a sweep's members side by side.
PNG files under RUN_DIR/report/; pipeline/report.py puts them in one HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.run_dir import RunDir
from pipeline.tokenized import open_split

CURVES = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
          ("tokens_per_second", "tokens / s"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a compute node
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed run
    return rows


def training_curves(run_dir: RunDir, out: Path) -> Path | None:
    """Loss (with held-out loss points when training evaluated), lr, grad norm, tokens/s by step."""
    rows = read_jsonl(run_dir.stage("train") / "metrics.jsonl")
    if not rows:
        return None
    return _save(curves_figure(rows, read_jsonl(run_dir.stage("train") / "eval.jsonl")),
                 out / "train_curves.png")


def curves_figure(rows: list[dict[str, Any]], evals: list[dict[str, Any]]):
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    steps = [r["step"] for r in rows]
    for axis, (key, title) in zip(axes.flat, CURVES):
        axis.plot(steps, [r.get(key, np.nan) for r in rows], label="train")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if evals:
        axes[0, 0].plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="held-out")
        axes[0, 0].legend()
    return figure


def confusion_matrix(run_dir: RunDir, out: Path, labels: list[str] | None = None) -> Path | None:
    metrics = read_json(run_dir.metrics_file)
    matrix = np.array(metrics.get("confusion_matrix") or [])
    if matrix.ndim != 2 or matrix.size == 0:
        return None
    names = labels if labels and len(labels) == len(matrix) else [str(i) for i in range(len(matrix))]
    title = f"held-out: accuracy {metrics.get('accuracy', 0):.3f}, macro F1 {metrics.get('macro_f1', 0):.3f}"
    return _save(confusion_figure(matrix, names, title), out / "confusion_matrix.png")


def confusion_figure(matrix: np.ndarray, names: list[str], title: str):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1 + 0.6 * len(names)))
    axis.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        axis.text(column, row, str(count), ha="center", va="center")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    return figure


def example_lengths(folder: Path) -> np.ndarray:
    """Tokens per example of a tokenized split (each packed example on its own)."""
    table = open_split(folder)
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    if "seq_lens" in table.column_names:
        return pc.list_flatten(table.column("seq_lens")).to_numpy()
    return pc.list_value_length(table.column("input_ids")).to_numpy()


def length_histograms(run_dir: RunDir, out: Path, max_seq_len: int) -> Path | None:
    """Per split: example lengths, the max_seq_len line and the share of examples truncated to it."""
    manifest = run_dir.read_manifest("tokenize")
    if not manifest:
        return None
    splits = [name for name, split in manifest["splits"].items() if split.get("rows")]
    plt = _pyplot()
    figure, axes = plt.subplots(1, max(1, len(splits)), figsize=(5 * max(1, len(splits)), 3.5), squeeze=False)
    for axis, name in zip(axes.flat, splits):
        split = manifest["splits"][name]
        axis.hist(example_lengths(run_dir.stage("tokenize") / name), bins=40)
        axis.axvline(max_seq_len, color="red", linestyle="--", label=f"max_seq_len {max_seq_len}")
        share = split.get("truncated", 0) / max(1, split["rows"])
        axis.set_title(f"{name}: {split['rows']} rows, {100 * share:.1f}% truncated")
        axis.set_xlabel("tokens per example")
        axis.legend()
    return _save(figure, out / "token_lengths.png")


def packing_efficiency(run_dir: RunDir, out: Path) -> Path | None:
    """With packing: the share of each split's packed rows' capacity holding real tokens."""
    manifest = run_dir.read_manifest("tokenize")
    splits = {n: s for n, s in (manifest or {}).get("splits", {}).items() if "packing_efficiency" in s}
    if not splits:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(4 + len(splits), 3.5))
    axis.bar(list(splits), [100 * s["packing_efficiency"] for s in splits.values()])
    for index, split in enumerate(splits.values()):
        axis.text(index, 100 * split["packing_efficiency"], f"{split['examples_per_row']:.1f} ex/row",
                  ha="center", va="bottom")
    axis.set_ylim(0, 105)
    axis.set_ylabel("% of row capacity holding tokens")
    axis.set_title("packing efficiency")
    return _save(figure, out / "packing_efficiency.png")


def sweep_comparison(members: list[tuple[str, RunDir]], out: Path) -> Path | None:
    """The members' loss curves on one axis and their final held-out loss (or accuracy) side by side."""
    curves = [(name, read_jsonl(run.stage("train") / "metrics.jsonl")) for name, run in members]
    curves = [(name, rows) for name, rows in curves if rows]
    if not curves:
        return None
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name, rows in curves:
        left.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    left.set_title("training loss")
    left.set_xlabel("step")
    left.legend(fontsize="small")
    finals = [(name, read_json(run.metrics_file)) for name, run in members]
    key = "accuracy" if any("accuracy" in m for _, m in finals) else "loss"
    right.bar([n for n, _ in finals], [m.get(key, np.nan) for _, m in finals])
    right.set_title(f"held-out {key}")
    right.tick_params(axis="x", rotation=30)
    return _save(figure, out / "sweep.png")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    figure.clf()
    _pyplot().close(figure)
    return path
