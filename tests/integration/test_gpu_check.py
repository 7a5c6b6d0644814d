"""benchmarks/gpu.py --cpu-smoke: the prepared GPU check's whole path (ftpipe run per backend and
strategy, evaluate, the packed-vs-unpacked loss check, the report), shrunk onto the CPU. It runs with
mlflow, deepspeed, datasets and submitit made unimportable, as on the GPU machine."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_runs_every_check_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu.py"),
            "--cpu-smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["problems"] == [] and report["imported_but_missing_on_device"] == []
    runs = {run["name"]: run["result"] for run in report["runs"]}
    assert set(runs) == {"sdpa-single", "sdpa-fsdp"}
    for result in runs.values():
        assert result["steps"] == 2 and result["tokens_derived"] == result["tokens_trained"] > 0
        assert 0 < result["attention_share"] < 1 and result["mfu"] > result["mfu_6n"] > 0
    evaluation = runs["sdpa-single"]["evaluate"]
    assert evaluation["eval_tokens"] > 0 and math.isfinite(evaluation["loss"])
    assert [(c["attn"], c["precision"], c["equal"]) for c in report["loss_checks"]] == [
        ("sdpa", "fp32", True),
        ("eager", "fp32", True),
    ]
    table = (out / "gpu_check.md").read_text()
    assert "| sdpa-fsdp | sdpa | fsdp | yes |" in table and "| eager | fp32 |" in table
