"""`evaluate.lm_eval`: lm-evaluation-harness tasks run on the consolidated (and the base) model.
Import-light: lm_eval is only looked for here (find_spec), imported by pipeline.lm_eval_run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.config_errors import Section

INSTALL_HINT = "pip install 'ftpipe[eval]'"


class LmEvalConfig(Section):
    tasks: list[str] = Field(
        min_length=1, description="lm-eval task (or group) names: built-in ones, or those the YAML files "
        "under include_path define.")
    include_path: str | None = Field(
        None, description="Folder (or YAML file) of your own task configs; with `dataset_path: json` and "
        "`dataset_kwargs: {data_files: ...}` they need no hub. Every file under it is fingerprinted.")
    num_fewshot: int | None = Field(
        None, ge=0, le=1000, description="Few-shot examples per prompt; null: each task's own setting.")
    limit: float | None = Field(
        None, gt=0, description="Documents per task: a count (>= 1) or a fraction (< 1); null: all.")
    batch_size: int = Field(8, ge=1, le=65_536, description="Requests per forward pass.")

    @model_validator(mode="before")
    @classmethod
    def _installed(cls, data: Any) -> Any:
        # Asked at `validate`, so that a login node says so before any job is queued.
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(f"needs the lm_eval package, which is not installed: {INSTALL_HINT}")
        return data

    @field_validator("include_path")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).exists():
            raise ValueError(f"no such file or folder: {path}")
        return path
