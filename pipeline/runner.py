"""Plan and execute stages: fingerprints decide what is up to date, manifests say what is done.

What a stage is (inputs, entry point, what its fingerprint covers) is declared in pipeline.stages.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pipeline
from pipeline import units
from pipeline.config import RunConfig
from pipeline.context import NullStageTracker, StageContext
from pipeline.digests import DigestCache, fingerprint
from pipeline.errors import StagePreempted, UserError
from pipeline.run_dir import FINGERPRINT_FILE, RunDir
from pipeline.stages import NAMES, STAGES, Stage, stage

FORCED = "forced"


@dataclass
class PlannedStage:
    name: str
    action: str  # run | skip | resume | stale (not selected and not up to date)
    reason: str
    fingerprint: str


def plan(cfg: RunConfig, stages: list[str] | None = None, force: tuple[str, ...] = ()) -> list[PlannedStage]:
    """Decide for each stage whether it runs, resumes or is skipped, and why."""
    selected = list(stages or NAMES)
    for name in (*selected, *force):
        stage(name)  # an unknown name is a one-line error
    run_dir = RunDir(cfg.run_dir)
    cache = DigestCache.of(cfg.output_dir)
    planned: dict[str, PlannedStage] = {}
    for name, spec in STAGES.items():
        fp = fingerprint({"config": spec.config_inputs(cfg, cache), "code": spec.code_version(),
                          "inputs": [planned[i].fingerprint for i in spec.inputs]})
        planned[name] = _decide(cfg, run_dir, spec, fp, planned, name in selected, name in force)
    cache.save()
    result = list(planned.values())
    _check_selection(result)
    return result


def _decide(cfg: RunConfig, run_dir: RunDir, spec: Stage, fp: str, planned: dict[str, PlannedStage],
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
    elif any(manifest.get("inputs", {}).get(i) != run_dir.read_manifest(i).get("run_id")
             for i in spec.inputs):
        reason = "input was redone since"
    elif spec.units is not None and (damage := units.first_problem(spec.unit_stage(), cfg, run_dir)):
        reason = damage  # the stage reruns with its units kept: only the damaged ones are redone
    else:
        return PlannedStage(spec.name, "skip", "up to date", fp)
    if not selected:
        return PlannedStage(spec.name, "stale", reason, fp)
    partial = run_dir.stage(spec.name) / FINGERPRINT_FILE
    resumable = manifest is None and not forced and partial.is_file() and partial.read_text().strip() == fp
    return PlannedStage(spec.name, "resume" if resumable else "run", reason, fp)


def _check_selection(result: list[PlannedStage]) -> None:
    by_name = {s.name: s for s in result}
    for planned in result:
        if planned.action not in ("run", "resume"):
            continue
        stale = [i for i in STAGES[planned.name].inputs if by_name[i].action == "stale"]
        if stale:
            raise UserError(f"--stages: {planned.name} needs {stale[0]}, which is not up to date "
                            f"({by_name[stale[0]].reason}); add it to --stages")


StageLauncher = Callable[[Stage, RunConfig, StageContext], dict[str, Any]]


def run_here(spec: Stage, cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return spec.run(cfg, ctx)


def execute(cfg: RunConfig, planned: list[PlannedStage], tracker=None, progress: bool = True,
            on_stage: Callable[[PlannedStage, dict | None], None] | None = None,
            launcher: StageLauncher = run_here) -> dict[str, dict]:
    """Run the planned stages in order; each manifest is written last, after its outputs."""
    run_dir = RunDir(cfg.run_dir)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, dict] = {}
    for planned_stage in planned:
        if planned_stage.action in ("run", "resume"):
            manifests[planned_stage.name] = run_stage(cfg, planned_stage, run_dir, tracker, progress,
                                                      launcher)
        if on_stage:
            on_stage(planned_stage, manifests.get(planned_stage.name))
    return manifests


def run_stage(cfg: RunConfig, planned: PlannedStage, run_dir: RunDir, tracker, progress: bool,
              launcher: StageLauncher = run_here) -> dict:
    spec = STAGES[planned.name]
    # A unit-wise stage checks each unit's own fingerprint: only its manifest goes.
    run_dir.claim_stage(spec.name, planned.fingerprint,
                        keep_units=spec.units is not None and planned.reason != FORCED)
    stage_run = tracker.stage(spec.name, {"action": planned.action, "reason": planned.reason,
                                          "fingerprint": planned.fingerprint}) if tracker else None
    ctx = StageContext(run_dir, tracker=stage_run or NullStageTracker(), progress=progress)
    started = time.time()
    try:
        manifest = launcher(spec, cfg, ctx)
    except BaseException as err:
        if stage_run:
            stage_run.finish("KILLED" if isinstance(err, StagePreempted) else "FAILED")
        raise
    manifest.update(stage=spec.name, fingerprint=planned.fingerprint, run_id=uuid.uuid4().hex,
                    inputs={i: run_dir.read_manifest(i)["run_id"] for i in spec.inputs},
                    code_version=spec.code_version(), ftpipe_version=pipeline.__version__,
                    started_at=started, wall_seconds=round(time.time() - started, 3))
    run_dir.write_manifest(spec.name, manifest)
    if stage_run:
        stage_run.finish("FINISHED", run_dir.manifest_path(spec.name))
    return manifest
