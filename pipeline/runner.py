"""Plan and execute stages: fingerprints decide what is up to date, manifests say what is done.

What a stage is (inputs, entry point, what its fingerprint covers) is declared in pipeline.stages.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline
from pipeline import units
from pipeline.changes import Change, describe, is_extension, stage_changes
from pipeline.config import RunConfig
from pipeline.context import NullStageTracker, StageContext, progress_log, stamp
from pipeline.digests import DigestCache, fingerprint
from pipeline.errors import StagePreempted, UserError
from pipeline.run_dir import RunDir
from pipeline.stages import NAMES, STAGES, Stage, stage

FORCED = "forced"


@dataclass
class PlannedStage:
    name: str
    action: str  # run | skip | resume | stale (not selected and not up to date) | refuse
    reason: str
    fingerprint: str
    covers: dict[str, Any] = field(default_factory=dict)  # what the fingerprint covers, by config key
    discard: bool = False  # the folder's earlier content is deleted before the stage runs
    warning: str = ""

    @property
    def claim(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "covers": self.covers, "version": STAGES[self.name].version}


def plan(cfg: RunConfig, stages: list[str] | None = None, force: tuple[str, ...] = (),
         upstream_submitted: bool = False) -> list[PlannedStage]:
    """Decide for each stage whether it runs, resumes or is skipped, and why; refuse (UserError) to
    redo a selected stage whose finished or resumable work a changed config would throw away.

    `upstream_submitted`: the unselected upstream stages are submitted ahead of these (a sweep's
    shared data jobs), so they need not be up to date yet.
    """
    selected = list(stages or NAMES)
    for name in (*selected, *force):
        stage(name)  # an unknown name is a one-line error
    run_dir = RunDir(cfg.run_dir)
    planned: dict[str, PlannedStage] = {}
    for spec, fp, covers in fingerprinted(cfg):
        action, reason, discard = _decide(cfg, run_dir, spec, fp, covers, planned, spec.name in force)
        if action != "skip" and spec.name not in selected:
            action, discard = "stale", False
        planned[spec.name] = PlannedStage(spec.name, action, reason, fp, covers, discard,
                                          _code_warning(run_dir, spec) if action == "skip" else "")
    result = list(planned.values())
    if not upstream_submitted:
        _check_selection(result)
    _check_links(run_dir, result, force)
    _check_refusals(result)
    return result


def fingerprinted(cfg: RunConfig) -> list[tuple[Stage, str, dict[str, Any]]]:
    """Each stage with its fingerprint and what that covers: config keys, file digests, version, inputs."""
    cache = DigestCache.of(cfg.output_dir)
    found: list[tuple[Stage, str, dict[str, Any]]] = []
    prints: dict[str, str] = {}
    for spec in STAGES.values():
        # Through JSON, so that what is compared with a manifest's record has the same types.
        covers = json.loads(json.dumps(spec.config_inputs(cfg, cache), sort_keys=True, default=str))
        prints[spec.name] = fingerprint({"config": covers, "version": spec.version,
                                         "inputs": [prints[i] for i in spec.inputs]})
        found.append((spec, prints[spec.name], covers))
    cache.save()
    return found


def _decide(cfg: RunConfig, run_dir: RunDir, spec: Stage, fp: str, covers: dict[str, Any],
            planned: dict[str, PlannedStage], forced: bool) -> tuple[str, str, bool]:
    """(action, reason, discard) for one stage; a unit-wise stage checks each unit itself, so only
    forcing it discards its units."""
    whole = spec.units is None
    manifest = run_dir.read_manifest(spec.name)
    upstream = [i for i in spec.inputs if planned[i].action in ("run", "resume", "stale")]
    if forced:  # a forced unit-wise stage whose inputs changed keeps the units they leave unchanged
        return "run", FORCED, whole or manifest is None or manifest.get("fingerprint") == fp
    if manifest is None:
        return _decide_partial(run_dir, spec, fp, covers)
    if upstream:
        return "run", f"input {upstream[0]} is being redone", whole
    if manifest.get("fingerprint") != fp:
        return _changed(run_dir, spec, stage_changes(manifest, covers, spec.version), "it finished")
    if any(manifest.get("inputs", {}).get(i) != run_dir.read_manifest(i).get("run_id") for i in spec.inputs):
        return "run", "input was redone since", whole
    if not whole and (damage := units.first_problem(spec.unit_stage(), cfg, run_dir)):
        return "run", damage, False  # units kept: only the damaged ones are redone
    return "skip", "up to date", False


def _decide_partial(run_dir: RunDir, spec: Stage, fp: str, covers: dict[str, Any]) -> tuple[str, str, bool]:
    claim = run_dir.read_claim(spec.name)
    if claim is not None and claim.get("fingerprint") == fp:
        return "resume", "not done yet", False
    kept = _resumable_work(run_dir, spec)
    if claim is None or kept is None:
        return "run", "not done yet", spec.units is None
    return _changed(run_dir, spec, stage_changes(claim, covers, spec.version),
                    f"{kept.parent.relative_to(run_dir.root)} was written")


def _resumable_work(run_dir: RunDir, spec: Stage) -> Path | None:
    """The latest piece of partial work a rerun would resume from (e.g. a complete checkpoint)."""
    found = sorted(run_dir.stage(spec.name).glob(spec.keeps)) if spec.keeps else []
    return found[-1] if found else None


def _changed(run_dir: RunDir, spec: Stage, found: list[Change], since: str) -> tuple[str, str, bool]:
    if is_extension(found, spec.extendable):
        return "resume", f"{describe(found)}: continues from its last checkpoint", False
    folder = run_dir.stage(spec.name)
    deletes = f"deletes {folder}" if spec.units is None else f"redoes the units of {folder} that changed"
    return "refuse", (f"{spec.name}: {describe(found)} since {since}; its results are kept. To redo it, "
                      f"--force {spec.name} ({deletes} and what depends on it), or give the run a new "
                      f"`name`"), False


def _code_warning(run_dir: RunDir, spec: Stage) -> str:
    recorded = (run_dir.read_manifest(spec.name) or {}).get("code_version")
    if recorded in (None, spec.code_version()):
        return ""
    return (f"{spec.name} was written by other ftpipe code (code version {recorded}, now "
            f"{spec.code_version()}); kept, because its output version ({spec.version}) is the same")


def _check_selection(result: list[PlannedStage]) -> None:
    by_name = {s.name: s for s in result}
    for planned in result:
        if planned.action not in ("run", "resume"):
            continue
        stale = [i for i in STAGES[planned.name].inputs if by_name[i].action == "stale"]
        if stale:
            raise UserError(f"--stages: {planned.name} needs {stale[0]}, which is not up to date "
                            f"({by_name[stale[0]].reason}); add it to --stages")


def _check_links(run_dir: RunDir, result: list[PlannedStage], force: tuple[str, ...]) -> None:
    """A sweep member's shard/ and tokenize/ are links to the base run's: never written through."""
    for planned in result:
        folder = run_dir.stage(planned.name)
        if folder.is_symlink() and (planned.action in ("run", "resume", "refuse") or planned.name in force):
            base = folder.resolve().parent
            raise UserError(f"{planned.name}: {folder} is the sweep base run's ({folder.resolve()}) and a "
                            f"sweep member never rewrites it; change or --force {planned.name} in the base "
                            f"run {base} (its config: {RunDir(base).config_file})")


def _check_refusals(result: list[PlannedStage]) -> None:
    refused = [p for p in result if p.action == "refuse"]
    if refused:
        raise UserError(refused[0].reason)


def claim_forced(cfg: RunConfig, planned: list[PlannedStage]) -> None:
    """Discard forced stages now, when their jobs are submitted: a job plans again on its own, and a
    requeued job must resume its work, not force it away a second time."""
    run_dir = RunDir(cfg.run_dir)
    for planned_stage in planned:
        if planned_stage.reason == FORCED and planned_stage.action == "run":
            run_dir.claim_stage(planned_stage.name, planned_stage.claim, discard=planned_stage.discard)


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
    run_dir.claim_stage(spec.name, planned.claim, discard=planned.discard)
    stage_run = tracker.stage(spec.name, {"action": planned.action, "reason": planned.reason,
                                          "fingerprint": planned.fingerprint}) if tracker else None
    ctx = StageContext(run_dir, tracker=stage_run or NullStageTracker(), progress=progress)
    progress_log.info("%s %s started (%s)", stamp(), spec.name, planned.reason)
    started = time.time()
    try:
        manifest = launcher(spec, cfg, ctx)
    except BaseException as err:
        if stage_run:
            stage_run.finish("KILLED" if isinstance(err, StagePreempted) else "FAILED")
        raise
    manifest.update(stage=spec.name, fingerprint=planned.fingerprint, covers=planned.covers,
                    version=spec.version, run_id=uuid.uuid4().hex,
                    inputs={i: run_dir.read_manifest(i)["run_id"] for i in spec.inputs},
                    code_version=spec.code_version(), ftpipe_version=pipeline.__version__,
                    started_at=started, wall_seconds=round(time.time() - started, 3))
    run_dir.write_manifest(spec.name, manifest)
    if stage_run:
        stage_run.finish("FINISHED", run_dir.manifest_path(spec.name))
    return manifest
