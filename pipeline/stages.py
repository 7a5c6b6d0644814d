"""Every stage, declared once: its inputs, entry point, fingerprint, code and traits.

The runner plans and executes from these declarations and launch/ reads their traits; nobody else
keeps a list of stage names. Import-light on purpose (no torch, no transformers): `ftpipe status`
and `validate` read it. Entry points are strings, resolved only when a stage runs, so that no stage
module is imported here and stages may import this module for their own fingerprints.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import RunConfig, inline_template
from pipeline.digests import DigestCache, model_digest, text_digest

PACKAGE_ROOT = Path(pipeline.__file__).parent.parent

# Plumbing every stage uses (config and its checks, run directory, errors, context, declarations):
# what a stage writes does not depend on their code, and a change in the config they read is
# fingerprinted as config. Every other package module a stage imports must be in its `code`.
PLUMBING = ("pipeline", "pipeline.config", "pipeline.config_errors", "pipeline.config_launch",
            "pipeline.config_sources", "pipeline.config_tracking", "pipeline.config_consolidate",
            "pipeline.config_model", "pipeline.config_evaluate", "pipeline.config_lm_eval",
            "pipeline.attention", "pipeline.context", "pipeline.errors", "pipeline.run_dir",
            "pipeline.digests", "pipeline.stages")

# Keys only the tokenize stage reads, and num_workers (the output is the same for any value),
# stay out of the shard fingerprint, so changing them does not re-shard.
NOT_SHARD_KEYS = {"max_seq_len", "overlong", "loss_on", "chat_template", "packing", "num_workers"}
# Settings that change how, not what, the run trains: changing them resumes instead of restarting.
# fused_loss and compile compute the same numbers faster (and runs from before they existed resume).
TRAIN_HOW = {"checkpoint_every", "keep_last", "log_every", "sample_ledger", "eval_every", "keep_best",
             "fused_loss", "compile"}
BATCH_LAYOUT = {"micro_batch_size", "grad_accum"}

ConfigInputs = Callable[[RunConfig, DigestCache], dict[str, Any]]


def shard_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    from pipeline.sources import source_digest, source_files

    data = cfg.data.model_dump(exclude=NOT_SHARD_KEYS)
    return {"data": data, "model": {"num_labels": cfg.model.num_labels},
            "data files": {s.name: source_digest(s, cfg.data, cache) for s in source_files(cfg)}}


def tokenize_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    template = cfg.data.chat_template
    if template and inline_template(template):  # as a file's: the same text inline or in a file is no change
        template = text_digest(template)
    elif template and Path(template).is_file():
        template = cache.digest(Path(template))
    data = {"max_seq_len": cfg.data.max_seq_len, "format": cfg.data.format, "loss_on": cfg.data.loss_on,
            "overlong": cfg.data.overlong, "packing": cfg.data.packing, "chat_template": template}
    return {"data": data, "tokenizer files": model_digest(cfg.model.name_or_path, cache, weights=False)}


def train_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    exclude = TRAIN_HOW | (BATCH_LAYOUT if cfg.train.global_batch_size is not None else set())
    return {"model": cfg.model.model_dump(), "data": {"labels": cfg.data.labels},
            "train": cfg.train.model_dump(exclude=exclude),
            "model weights": model_digest(cfg.model.name_or_path, cache, weights=True),
            "model files": model_digest(cfg.model.name_or_path, cache, weights=False)}


def consolidate_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    # The chat template, the label names and the training precision reach it through train's inputs.
    # Runs consolidated before this section existed see `consolidate.dtype: (unset) -> auto` here.
    # checkpoint: final, the only choice before it could be set, is left out like an unset key.
    return {"consolidate": cfg.consolidate.model_dump(exclude={"checkpoint"} if
                                                      cfg.consolidate.checkpoint == "final" else set())}


# Keys added to the evaluate section later, with their defaults: a key at its default is left out, so
# evaluations written before it existed stay up to date.
EVALUATE_LATER_KEYS = {"max_rows": None, "prompts": None, "temperature": 0.0, "top_p": 1.0, "lm_eval": None}


def evaluate_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    section = cfg.evaluate.model_dump()
    # Keys at their defaults are left out: evaluations written before they existed stay up to date.
    unset = {key for key, default in EVALUATE_LATER_KEYS.items() if section.get(key) == default}
    inputs = {"evaluate": cfg.evaluate.model_dump(exclude=unset), "train": {"seed": cfg.train.seed}}
    prompts = cfg.evaluate.prompts
    if prompts and Path(prompts).is_file():
        inputs["prompts file"] = cache.digest(Path(prompts))
    lm_eval = cfg.evaluate.lm_eval
    if lm_eval is not None and lm_eval.include_path is not None:
        inputs["lm_eval task files"] = folder_digests(Path(lm_eval.include_path), cache)
    return inputs


def folder_digests(root: Path, cache: DigestCache) -> dict[str, str]:
    """Every file under `root` (or `root` itself, a file) by its path relative to `root`: task YAMLs
    and any data files kept beside them."""
    if root.is_file():
        return {root.name: cache.digest(root)}
    return {p.relative_to(root).as_posix(): cache.digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function", called as function(cfg, ctx) -> manifest
    inputs: tuple[str, ...]  # upstream stages, whose manifests it reads
    config_inputs: ConfigInputs  # what of the config (and the files it names) the fingerprint covers
    code: tuple[str, ...]  # package modules whose code the output depends on (see PLUMBING)
    units: str | None = None  # "module:OBJECT", a UnitStage: split into units / job-array tasks
    distributed: bool = False  # runs under torchrun on every node of its job
    shared_by_sweep: bool = False  # sweep members link to the base run's output instead of redoing it
    gpu: bool = False  # its SLURM job goes to the GPU partition
    # ... or only when the model's weights exceed launch.slurm.large_model_gb (launch.slurm.needs_gpu)
    gpu_for_large_model: bool = False
    # Bumped by us when what the stage writes changes meaning; a code change alone keeps results valid.
    version: int = 1
    keeps: str | None = None  # glob (in its folder) of partial work to resume from: never deleted unasked
    extendable: tuple[str, ...] = ()  # config keys whose increase continues the stage instead of redoing it

    def run(self, cfg: RunConfig, ctx: Any) -> dict[str, Any]:
        if self.name != "shard":
            cfg = with_shard_labels(cfg, ctx.run_dir)
        return _resolve(self.entry)(cfg, ctx)

    def unit_stage(self) -> Any:
        assert self.units is not None, f"{self.name} is not unit-wise"
        return _resolve(self.units)

    def code_version(self) -> str:
        """A digest of the stage's code: recorded for provenance; a mismatch is a warning, not a rerun."""
        digest = hashlib.sha256(pipeline.__version__.encode())
        for module in sorted(self.code):
            digest.update(module_path(module).read_bytes())
        return digest.hexdigest()[:16]


def with_shard_labels(cfg: RunConfig, run_dir: Any) -> RunConfig:
    """The config the stages after shard see: classification label names inferred by the shard
    stage (its manifest's "labels") as data.labels and model.num_labels. Fingerprints keep using
    the config as written; the inferred names follow from the data files, which they cover."""
    if cfg.data.format != "classification" or cfg.data.labels:
        return cfg
    names = (run_dir.read_manifest("shard") or {}).get("labels")
    if not names:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": names}),
                                  "model": cfg.model.model_copy(update={"num_labels": len(names)})})


def module_path(module: str) -> Path:
    path = PACKAGE_ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


_DECLARED = (
    Stage("shard", "pipeline.shard:run", (), shard_inputs,
          ("pipeline.shard", "pipeline.formats", "pipeline.sources", "pipeline.parallel", "pipeline.units",
           "pipeline.readers", "pipeline.hf_sources", "pipeline.labels"),
          units="pipeline.shard:UNITS", shared_by_sweep=True, version=2),
    Stage("tokenize", "pipeline.tokenize:run", ("shard",), tokenize_inputs,
          ("pipeline.tokenize", "pipeline.encoding", "pipeline.packing", "pipeline.tokenizer",
           "pipeline.parallel", "pipeline.sources", "pipeline.hf_sources", "pipeline.units",
           "pipeline.tokenized"),
          units="pipeline.tokenize:UNITS", shared_by_sweep=True),
    Stage("train", "pipeline.train.stage:run", ("tokenize",), train_inputs,
          ("pipeline.train", "pipeline.train.stage", "pipeline.train.build", "pipeline.train.checkpoint",
           "pipeline.train.data", "pipeline.train.ds_engine", "pipeline.train.engine", "pipeline.train.fsdp",
           "pipeline.train.loop", "pipeline.train.objective", "pipeline.train.partial",
           "pipeline.train.loss_head", "pipeline.train.step_log", "pipeline.train.held_out",
           "pipeline.train.prefetch", "pipeline.train.tiled_attention", "pipeline.eval_metrics",
           "pipeline.host_memory",
           "pipeline.preemption", "pipeline.precision", "pipeline.models", "pipeline.distributed",
           "pipeline.tokenized", "pipeline.unpickling", "pipeline.system_metrics"),
          distributed=True, gpu=True, keeps="checkpoints/step-*/COMPLETE",
          extendable=("train.max_steps", "train.epochs")),
    Stage("consolidate", "pipeline.consolidate:run", ("train",), consolidate_inputs,
          ("pipeline.consolidate", "pipeline.precision", "pipeline.checkpoint_readers", "pipeline.hf_writer",
           "pipeline.models", "pipeline.tokenizer", "pipeline.unpickling", "pipeline.lora_out",
           "pipeline.model_checks", "pipeline.model_card", "pipeline.train", "pipeline.train.checkpoint",
           "pipeline.train.engine", "pipeline.distributed")),
    Stage("evaluate", "pipeline.evaluate:run", ("consolidate",), evaluate_inputs,
          ("pipeline.evaluate", "pipeline.eval_metrics", "pipeline.consolidate", "pipeline.prompts",
           "pipeline.model_card", "pipeline.precision",
           "pipeline.checkpoint_readers", "pipeline.hf_writer", "pipeline.lora_out", "pipeline.model_checks",
           "pipeline.models", "pipeline.tokenizer", "pipeline.tokenized", "pipeline.distributed",
           "pipeline.train", "pipeline.train.data", "pipeline.train.objective", "pipeline.unpickling",
           "pipeline.train.loss_head", "pipeline.train.tiled_attention",
           "pipeline.train.checkpoint", "pipeline.train.engine", "pipeline.lm_eval_run"),
          distributed=True,  # data parallel on the training ranks, under torchrun like train
          gpu_for_large_model=True),
)

STAGES: dict[str, Stage] = {stage.name: stage for stage in _DECLARED}
NAMES: tuple[str, ...] = tuple(STAGES)
LAST = NAMES[-1]


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        from pipeline.errors import UserError

        raise UserError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}") from None


def names(trait: str, value: bool = True) -> tuple[str, ...]:
    """The stages whose `trait` (distributed, shared_by_sweep, gpu, units) is set (or unset)."""
    return tuple(s.name for s in _DECLARED if bool(getattr(s, trait)) == value)
