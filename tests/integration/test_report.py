"""The run's pictures and its report page: drawn from what the stages wrote, logged to a real MLflow
server, and loaded in a real headless chromium (no console errors, every section, every image decoded)."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from pipeline import plots
from pipeline.run_dir import RunDir
from tests import fixtures
from tests.helpers import free_port, ftpipe, losses, manifest
from tests.processes import kill_tree, start_mlflow_server

SECTIONS = ("stages", "plots", "metrics", "samples", "rejects", "manifests", "config")
PICTURES = ("train_curves", "confusion_matrix", "token_lengths")
# Loads the report in an iframe and writes what it found into this page, which --dump-dom prints.
HARNESS = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="page" src="{page}"></iframe><script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => {{
  const doc = frame.contentDocument;
  const images = [...doc.images].map(i => ({{alt: i.alt, complete: i.complete, width: i.naturalWidth}}));
  const sections = [...doc.querySelectorAll("section")].map(s => s.id);
  document.getElementById("result").textContent = JSON.stringify({{images, sections}});
}});
</script></body></html>"""


@pytest.fixture(scope="module")
def reported(tmp_path_factory, tiny_bert):
    """One classification run, tracked on a real `mlflow server`, that both tests read."""
    tmp_path = tmp_path_factory.mktemp("reported")
    data = fixtures.write_jsonl(tmp_path / "labelled.jsonl", fixtures.labelled(400))
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    try:
        tracking = {"enabled": True, "report": True, "mlflow_uri": f"http://127.0.0.1:{port}"}
        cfg = fixtures.classification_config(tmp_path, tiny_bert, data, tracking=tracking,
                                             train={"max_steps": 6, "checkpoint_every": 6})
        assert ftpipe("run", fixtures.write_config(tmp_path / "cls.yaml", cfg), "--no-progress") == 0
        yield RunDir(tmp_path / "runs" / "cls"), f"http://127.0.0.1:{port}"
    finally:
        kill_tree(server)


def test_plots_hold_the_runs_numbers_and_are_the_runs_mlflow_artifacts(reported):
    run, server = reported
    folder = run.root / "report"
    for name in PICTURES:
        image = imread(folder / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.01, name  # not blank
    rows = plots.read_jsonl(run.stage("train") / "metrics.jsonl")
    figure = plots.curves_figure(rows, [])
    assert list(figure.axes[0].lines[0].get_ydata()) == pytest.approx(losses(run))
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["loss", "learning rate", "gradient norm", "tokens / s"]
    metrics = json.loads(run.metrics_file.read_text())
    labels = manifest(run, "shard").get("labels") or ["negative", "positive"]
    confusion = plots.confusion_figure(np.array(metrics["confusion_matrix"]), labels, "")
    assert confusion.axes[0].images[0].get_array().tolist() == metrics["confusion_matrix"]
    for split in ("train", "eval"):
        lengths = plots.example_lengths(run.stage("tokenize") / split)
        assert len(lengths) == manifest(run, "tokenize")["splits"][split]["rows"] and lengths.max() <= 24
    client = MlflowClient(tracking_uri=server)
    parent = next(r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                  if "mlflow.parentRunId" not in r.data.tags)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {f"report/{n}.png" for n in PICTURES} | {"report/report.html"}


def test_report_loads_in_headless_chromium(reported, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    run, _ = reported
    page = run.root / "report" / "report.html"
    text = page.read_text()
    assert not any(ref in text for ref in ('src="http', "src='http", 'href="http', "<link", "<script")), \
        "self-contained: nothing loaded from elsewhere, no script"
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS.format(page=page.as_uri()))
    # No background networking: on a machine with a closed network chromium's own connections (updates,
    # sync, lookups of Google's hosts) are refused or left waiting.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-quic", "--virtual-time-budget=5000",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([browser, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom",
                          harness.as_uri()], capture_output=True, text=True, timeout=120)
    found = json.loads(dom.stdout.split('<pre id="result">')[1].split("</pre>")[0])
    assert found["sections"] == list(SECTIONS)
    assert sorted(i["alt"] for i in found["images"]) == sorted(PICTURES)
    assert all(i["complete"] and i["width"] > 100 for i in found["images"]), found["images"]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]  # chromium's console log
    assert not console, console
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.05, "the page renders (a blank screenshot has no variance)"
