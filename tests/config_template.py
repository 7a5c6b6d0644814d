"""The small config that test_config*.py edit line by line, and how they read its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import UserError

# Tests name lines of this template (`{path}:8:`); edits keep the line count so they stay valid.
BASE = """\
name: demo
output_dir: {out}
model:
  name_or_path: {model}
  task: causal_lm
data:
  train: [{train}]
  eval_fraction: 0.2
  num_shards: 2
train:
  lr: 1.0e-3
  micro_batch_size: 4
  precision: fp32
tracking:
  enabled: false
"""


def q(path: Path | str) -> str:
    return json.dumps(str(path))  # a JSON string is a valid YAML scalar, whatever the path holds


def write_from_template(folder: Path, model_dir: Path, data_file: Path, replace: dict[str, str] | None = None,
                        text: str | None = None, name: str = "cfg.yaml") -> Path:
    """BASE with each `old: new` line replaced (or `text` as it is), written to folder/name."""
    body = text if text is not None else BASE.format(out=q(folder / "runs"), model=q(model_dir),
                                                     train=q(data_file))
    for old, new in (replace or {}).items():
        assert old in body, old
        body = body.replace(old, new)
    assert text is not None or body.count("\n") == BASE.count("\n")
    path = folder / name
    path.write_text(body)
    return path


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return str(info.value)
