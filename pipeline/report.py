"""`ftpipe report RUN_DIR`: one self-contained HTML page of a run (plots inline, stage table, metrics,
samples, rejects with their first reasons, manifests, config) that opens from a shared filesystem
without a server. Written with the plots under RUN_DIR/report/ after every run."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from pipeline import plots
from pipeline.run_dir import RunDir
from pipeline.stages import NAMES, names

REPORT_DIR = "report"
SHOWN_REJECTS = 5
SHOWN_SAMPLES = 20


def write_plots(run_dir: RunDir, config: dict[str, Any]) -> list[Path]:
    out = run_dir.root / REPORT_DIR
    max_seq_len = config.get("data", {}).get("max_seq_len", 0)
    labels = (run_dir.read_manifest("shard") or {}).get("labels") or config.get("data", {}).get("labels")
    drawn = [plots.training_curves(run_dir, out), plots.confusion_matrix(run_dir, out, labels),
             plots.length_histograms(run_dir, out, max_seq_len), plots.packing_efficiency(run_dir, out)]
    members = sweep_members(run_dir)
    if members:
        drawn.append(plots.sweep_comparison(members, out))
    return [path for path in drawn if path is not None]


def sweep_members(run_dir: RunDir) -> list[tuple[str, RunDir]]:
    if not run_dir.sweep_file.is_file():
        return []
    members = json.loads(run_dir.sweep_file.read_text()).get("members", [])
    return [(m["name"], RunDir(Path(m["run_dir"]))) for m in members]


def write_report(run_dir: RunDir) -> list[Path]:
    """The plots and report.html; returns every file written."""
    import yaml

    config = yaml.safe_load(run_dir.config_file.read_text()) if run_dir.config_file.is_file() else {}
    images = write_plots(run_dir, config or {})
    page = run_dir.root / REPORT_DIR / "report.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(run_dir, images, config or {}), encoding="utf-8")
    return [*images, page]


def render(run_dir: RunDir, images: list[Path], config: dict[str, Any]) -> str:
    sections = [("stages", "Stages", _stages(run_dir)), ("plots", "Plots", _images(images)),
                ("metrics", "Held-out metrics", _metrics(run_dir)),
                ("samples", "Samples", _samples(run_dir)), ("rejects", "Rejected rows", _rejects(run_dir)),
                ("manifests", "Manifests", _manifests(run_dir)),
                ("config", "Config", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>")]
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>'
                   for key, title, content in sections)
    title = html.escape(f"ftpipe run {config.get('name', run_dir.root.name)}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1><p>{html.escape(str(run_dir.root))}</p>"
            f"{body}</body></html>")


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
         "img{max-width:100%;display:block;margin:1em 0}pre{background:#f6f6f6;padding:1em;overflow:auto}")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _stages(run_dir: RunDir) -> str:
    rows = []
    for name in NAMES:
        manifest = run_dir.read_manifest(name)
        state = "done" if manifest else ("partial" if run_dir.stage(name).exists() else "not run")
        rows.append([name, state, f"{manifest['wall_seconds']:.1f}" if manifest else ""])
    return _table(["stage", "state", "seconds"], rows)


def _images(images: list[Path]) -> str:
    if not images:
        return "<p>none</p>"
    return "".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption>'
                   "</figure>" for p in images)


def _metrics(run_dir: RunDir) -> str:
    metrics = plots.read_json(run_dir.metrics_file)
    base = metrics.get("base") or {}
    rows = [[key, base.get(key, ""), value] for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return _table(["metric", "before (base model)", "after"], rows)


def _samples(run_dir: RunDir) -> str:
    rows = plots.read_jsonl(run_dir.stage("evaluate") / "samples.jsonl")[:SHOWN_SAMPLES]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return _table(keys, [[row.get(k, "") for k in keys] for row in rows])


def _rejects(run_dir: RunDir) -> str:
    rows = []
    for name in names("units"):  # the stages that read rows, and may reject them
        manifest = run_dir.read_manifest(name) or {}
        records = plots.read_jsonl(run_dir.stage(name) / manifest.get("rejects_file", "rejects.jsonl"))
        reasons = "; ".join(str(r.get("reason")) for r in records[:SHOWN_REJECTS])
        rows.append([name, manifest.get("rejected", len(records)), reasons])
    return _table(["stage", "rejected rows", f"first {SHOWN_REJECTS} reasons"], rows)


def _manifests(run_dir: RunDir) -> str:
    parts = []
    for name in NAMES:
        manifest = run_dir.read_manifest(name)
        if manifest:
            text = html.escape(json.dumps(manifest, indent=2))
            parts.append(f"<details><summary>{name}</summary><pre>{text}</pre></details>")
    return "".join(parts) or "<p>none</p>"
