"""Running the real CLI from tests, in-process or as a separate process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from launch.cli import main
from pipeline.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]


def ftpipe(*args: str | Path | RunDir) -> int:
    return main([str(a.root if isinstance(a, RunDir) else a) for a in args])


def ftpipe_process(*args: str, cwd: Path | None = None, env: dict | None = None,
                   script: str | None = None) -> subprocess.CompletedProcess:
    """Run ftpipe in a fresh interpreter; `script` runs first (e.g. to inject a fault)."""
    code = (script or "") + "\nimport sys\nfrom launch.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def ftpipe_imports(*args: str) -> dict[str, bool]:
    """Run ftpipe in a fresh interpreter (it must succeed); whether it imported transformers and torch."""
    probe = ("import atexit, json, sys\natexit.register(lambda: print(json.dumps({m: m in sys.modules "
             "for m in ('transformers', 'torch')})))\n")
    proc = ftpipe_process(*args, script=probe)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _root(run_dir: Path | RunDir) -> Path:
    return run_dir.root if isinstance(run_dir, RunDir) else run_dir


def losses(run_dir: Path | RunDir) -> list[float]:
    lines = (_root(run_dir) / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line.strip()]


def manifest(run_dir: Path | RunDir, stage: str) -> dict:
    return json.loads((_root(run_dir) / stage / "manifest.json").read_text())


def weights(run_dir: Path | RunDir) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted((_root(run_dir) / "consolidate" / "model").glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float,
                         atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=rtol, atol=atol), (
            key, float((a[key] - b[key]).abs().max()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_holding(root: Path, secret: str) -> list[str]:
    """Files under `root` whose bytes contain `secret`, relative to `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and secret.encode() in p.read_bytes())


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
