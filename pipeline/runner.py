"""Plan and execute stages: fingerprints decide what is up to date, manifests say what is done."""

from __future__ import annotations

import hashlib
import importlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import RunConfig
from pipeline.context import NullStageTracker, StageContext
from pipeline.errors import StagePreempted, UserError
from pipeline.run_dir import STAGES, DigestCache, RunDir, fingerprint

PACKAGE_DIR = Path(pipeline.__file__).parent
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def _files(folder: Path, weights: bool) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES) \
        if weights else sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in WEIGHT_SUFFIXES)


def _model_digest(cfg: RunConfig, cache: DigestCache, weights: bool) -> dict[str, str]:
    folder = Path(cfg.model.name_or_path)
    if not folder.exists():
        return {"hub_id": cfg.model.name_or_path}
    return {str(p.relative_to(folder)): cache.digest(p) for p in _files(folder, weights)}


# Keys only the tokenize stage reads, and num_workers (the output is the same for any value),
# stay out of the shard fingerprint, so changing them does not re-shard.
NOT_SHARD_KEYS = {"max_seq_len", "overlong", "loss_on", "chat_template", "packing", "num_workers"}


def _shard_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    from pipeline.sources import source_files

    data = cfg.data.model_dump(exclude=NOT_SHARD_KEYS)
    return {"data": data, "num_labels": cfg.model.num_labels,
            "files": {str(s.path): cache.digest(s.path) for s in source_files(cfg)}}


def _tokenize_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    template = cfg.data.chat_template
    return {"max_seq_len": cfg.data.max_seq_len, "format": cfg.data.format, "loss_on": cfg.data.loss_on,
            "overlong": cfg.data.overlong, "packing": cfg.data.packing,
            "chat_template": cache.digest(Path(template)) if template and Path(template).is_file() else template,
            "tokenizer": _model_digest(cfg, cache, weights=False)}


def tokenizer_digest(cfg: RunConfig) -> dict[str, str]:
    """The tokenizer's files by content (the model folder's files other than weights)."""
    return _model_digest(cfg, digest_cache(cfg), weights=False)


def digest_cache(cfg: RunConfig) -> DigestCache:
    return DigestCache(Path(cfg.output_dir) / ".digest-cache.json")


def shard_unit_fingerprints(cfg: RunConfig, sources: list[Any]) -> list[str]:
    """One per source file (SourceFile): what its shard pieces depend on (its content and
    settings, not the other files)."""
    cache = digest_cache(cfg)
    base = {"data": cfg.data.model_dump(exclude=NOT_SHARD_KEYS | {"train", "eval"}),
            "num_labels": cfg.model.num_labels, "code": SPECS["shard"].code_version()}
    return [fingerprint({**base, "file": str(s.path), "digest": cache.digest(s.path), "held_out": s.held_out,
                         "weight": s.weight, "limit": s.limit}) for s in sources]


def tokenize_unit_fingerprints(cfg: RunConfig, piece_fingerprints: list[str]) -> list[str]:
    """One per shard piece: the piece's own fingerprint, the tokenizer, the tokenize keys and code."""
    base = {"config": _tokenize_inputs(cfg, digest_cache(cfg)), "code": SPECS["tokenize"].code_version()}
    return [fingerprint({**base, "piece": piece}) for piece in piece_fingerprints]


# Settings that change how, not what, the run trains: changing them resumes instead of restarting.
TRAIN_HOW = {"checkpoint_every", "keep_last", "log_every", "sample_ledger"}
BATCH_LAYOUT = {"micro_batch_size", "grad_accum"}


def _train_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    exclude = TRAIN_HOW | (BATCH_LAYOUT if cfg.train.global_batch_size is not None else set())
    return {"model": cfg.model.model_dump(), "labels": cfg.data.labels, "train": cfg.train.model_dump(exclude=exclude),
            "weights": _model_digest(cfg, cache, weights=True), "config": _model_digest(cfg, cache, False)}


def _evaluate_inputs(cfg: RunConfig, cache: DigestCache) -> dict[str, Any]:
    return {"evaluate": cfg.evaluate.model_dump(), "seed": cfg.train.seed}


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    inputs: tuple[str, ...]
    config_inputs: Callable[[RunConfig, DigestCache], dict[str, Any]]
    code: tuple[str, ...]
    # The stage keeps per-shard outputs with their own fingerprints and redoes only stale ones.
    unit_cache: bool = False

    def run(self, cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
        return importlib.import_module(self.module).run(cfg, ctx)

    def code_version(self) -> str:
        digest = hashlib.sha256(pipeline.__version__.encode())
        for pattern in self.code:
            for path in sorted(PACKAGE_DIR.glob(pattern)):
                digest.update(path.read_bytes())
        return digest.hexdigest()[:16]


SPECS: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("shard", "pipeline.shard", (), _shard_inputs, ("shard.py", "formats.py", "sources.py"), unit_cache=True),
    StageSpec("tokenize", "pipeline.tokenize", ("shard",), _tokenize_inputs,
              ("tokenize.py", "encoding.py", "packing.py", "tokenizer.py"), unit_cache=True),
    StageSpec("train", "pipeline.train.stage", ("tokenize",), _train_inputs, ("train/*.py", "models.py", "distributed.py")),
    StageSpec("consolidate", "pipeline.consolidate", ("train",), lambda c, d: {},
              ("consolidate.py", "train/engine.py")),
    StageSpec("evaluate", "pipeline.evaluate", ("consolidate",), _evaluate_inputs,
              ("evaluate.py", "train/objective.py", "train/data.py")),
)}


FORCED = "forced"


@dataclass
class PlannedStage:
    name: str
    action: str  # run | skip | resume | stale (not selected and not up to date)
    reason: str
    fingerprint: str


def plan(cfg: RunConfig, stages: list[str] | None = None, force: tuple[str, ...] = ()) -> list[PlannedStage]:
    """Decide for each stage whether it runs, resumes or is skipped, and why."""
    selected = list(stages or STAGES)
    for name in (*selected, *force):
        if name not in SPECS:
            raise UserError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    run_dir = RunDir(cfg.run_dir)
    cache = DigestCache(Path(cfg.output_dir) / ".digest-cache.json")
    planned: dict[str, PlannedStage] = {}
    for name in STAGES:
        spec = SPECS[name]
        fp = fingerprint({"config": spec.config_inputs(cfg, cache), "code": spec.code_version(),
                          "inputs": [planned[i].fingerprint for i in spec.inputs]})
        planned[name] = _decide(run_dir, spec, fp, planned, name in selected, name in force)
    cache.save()
    result = [planned[n] for n in STAGES]
    _check_selection(result)
    return result


def _decide(run_dir: RunDir, spec: StageSpec, fp: str, planned: dict[str, PlannedStage],
            selected: bool, forced: bool) -> PlannedStage:
    manifest = run_dir.read_manifest(spec.name)
    upstream = [i for i in spec.inputs if planned[i].action in ("run", "resume", "stale")]
    if forced:
        reason = FORCED
    elif manifest is None:
        reason = "not done yet"
    elif upstream:
        reason = f"input {upstream[0]} is being redone"
    elif manifest.get("fingerprint") != fp:
        reason = "config, inputs or code changed"
    elif any(manifest.get("inputs", {}).get(i) != run_dir.read_manifest(i).get("run_id") for i in spec.inputs):
        reason = "input was redone since"
    else:
        return PlannedStage(spec.name, "skip", "up to date", fp)
    if not selected:
        return PlannedStage(spec.name, "stale", reason, fp)
    partial = (run_dir.stage(spec.name) / ".fingerprint")
    resumable = manifest is None and not forced and partial.is_file() and partial.read_text().strip() == fp
    return PlannedStage(spec.name, "resume" if resumable else "run", reason, fp)


def _check_selection(result: list[PlannedStage]) -> None:
    for index, stage in enumerate(result):
        if stage.action not in ("run", "resume"):
            continue
        stale = [s.name for s in result[:index] if s.action == "stale" and s.name in SPECS[stage.name].inputs]
        if stale:
            raise UserError(f"--stages: {stage.name} needs {stale[0]}, which is not up to date "
                            f"({result[[s.name for s in result].index(stale[0])].reason}); add it to --stages")


StageLauncher = Callable[[StageSpec, RunConfig, StageContext], dict[str, Any]]


def run_here(spec: StageSpec, cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return spec.run(cfg, ctx)


def execute(cfg: RunConfig, planned: list[PlannedStage], tracker=None, progress: bool = True,
            on_stage: Callable[[PlannedStage, dict | None], None] | None = None,
            launcher: StageLauncher = run_here) -> dict[str, dict]:
    """Run the planned stages in order; each manifest is written last, after its outputs."""
    run_dir = RunDir(cfg.run_dir)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, dict] = {}
    for stage in planned:
        if stage.action in ("run", "resume"):
            manifests[stage.name] = run_stage(cfg, stage, run_dir, tracker, progress, launcher)
        if on_stage:
            on_stage(stage, manifests.get(stage.name))
    return manifests


def run_stage(cfg: RunConfig, stage: PlannedStage, run_dir: RunDir, tracker, progress: bool,
              launcher: StageLauncher = run_here) -> dict:
    spec = SPECS[stage.name]
    run_dir.claim_stage(stage.name, stage.fingerprint, keep_units=spec.unit_cache and stage.reason != FORCED)
    stage_run = tracker.stage(stage.name, {"action": stage.action, "reason": stage.reason,
                                           "fingerprint": stage.fingerprint}) if tracker else None
    ctx = StageContext(run_dir, tracker=stage_run or NullStageTracker(), progress=progress)
    started = time.time()
    try:
        manifest = launcher(spec, cfg, ctx)
    except BaseException as err:
        if stage_run:
            stage_run.finish("KILLED" if isinstance(err, StagePreempted) else "FAILED")
        raise
    manifest.update(stage=stage.name, fingerprint=stage.fingerprint, run_id=uuid.uuid4().hex,
                    inputs={i: run_dir.read_manifest(i)["run_id"] for i in spec.inputs},
                    code_version=spec.code_version(), ftpipe_version=pipeline.__version__,
                    started_at=started, wall_seconds=round(time.time() - started, 3))
    run_dir.write_manifest(stage.name, manifest)
    if stage_run:
        stage_run.finish("FINISHED", run_dir.manifest_path(stage.name))
    return manifest
