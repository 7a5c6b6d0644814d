"""Running a planned pipeline on this machine, in this process."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import yaml

from launch.torchrun import launch_stage
from pipeline.config import RunConfig
from pipeline.context import clock, progress_log, stamp
from pipeline.errors import StagePreempted
from pipeline.run_dir import RunDir
from pipeline.runner import PlannedStage, execute
from pipeline.secrets import has_credentials, stored_config, write_credentials
from pipeline.stages import LAST
from pipeline.tracking import Tracker, build_tracker, read_parent
from pipeline.tracking_tags import outer_run, run_tags

log = logging.getLogger("ftpipe")


def write_run_config(cfg: RunConfig) -> RunDir:
    """The resolved config, which every later process (torchrun ranks, SLURM jobs) reads; the tracking
    URI's credentials only in the owner-only credentials file."""
    run_dir = RunDir(cfg.run_dir.resolve())
    run_dir.write_config(yaml.safe_dump(stored_config(cfg.model_dump(mode="json")), sort_keys=False))
    if has_credentials(cfg.tracking.mlflow_uri):
        write_credentials(run_dir, cfg.tracking.mlflow_uri)
    return run_dir


def run_pipeline(cfg: RunConfig, planned: list[PlannedStage], progress: bool = True) -> dict[str, dict]:
    """Execute the plan with MLflow tracking; the parent run ends FAILED if a stage raises. A parent
    that `ftpipe submit` created stays open until the run's last stage is done."""
    run_dir = write_run_config(cfg)
    tracker = build_tracker(cfg)
    attached = read_parent(run_dir, tracker.uri) if tracker else None
    if tracker:
        tracker.start(cfg.model_dump(mode="json"), parent_tags(cfg, run_dir), attach_to=attached)
    status = "FAILED"
    try:
        manifests = execute(cfg, planned, tracker, progress, on_stage=lambda s, m: _report(s, m, tracker),
                            launcher=launch_stage)
        status = "FINISHED"
        return manifests
    except StagePreempted:
        status = "KILLED"
        raise
    finally:
        if cfg.tracking.report:
            _report_files(run_dir, tracker)
        finished = status != "FINISHED" or not attached or run_dir.read_manifest(LAST) is not None
        if tracker and not tracker.close(status if finished else None):
            log.warning("tracking incomplete for this run (see warnings above)")


def _report_files(run_dir: RunDir, tracker: Tracker | None) -> None:
    """The plots and report.html, in MLflow too; a failure here costs a warning, never the run."""
    from pipeline.report import write_report

    try:
        written = write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - pictures of a run must not fail the run
        log.warning("report not written: %s: %s", type(err).__name__, (str(err) or " ").splitlines()[0])
        return
    for path in written if tracker else []:
        tracker.log_artifact(path, "report")


def parent_tags(cfg: RunConfig, run_dir: RunDir, parent_of: str | None = None) -> dict[str, str]:
    """The parent run's tags; it goes under `parent_of` (a sweep's parent) or MLFLOW_RUN_ID's run."""
    outer = parent_of or outer_run()
    return {**run_tags(cfg, run_dir.root), **({"mlflow.parentRunId": outer} if outer else {})}


def _report(stage: PlannedStage, manifest: dict | None, tracker: Tracker | None) -> None:
    if manifest is None:
        progress_log.info("%s %-11s skipped (%s)", stamp(), stage.name, stage.reason)
        if tracker:
            tracker.set_tag(f"ftpipe.stage.{stage.name}", "skipped")
        return
    progress_log.info("%s %-11s done in %s", stamp(), stage.name, _duration(manifest["wall_seconds"]))
    if tracker:
        tracker.set_tag(f"ftpipe.stage.{stage.name}", stage.action)
        tracker.log_parent_metrics(_headline(stage.name, manifest))


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else clock(seconds)


def _headline(stage: str, manifest: dict[str, Any]) -> dict[str, float]:
    from pipeline.evaluate import scalar_metrics

    if stage == "evaluate":
        return {f"eval_{k}": v for k, v in scalar_metrics(manifest["metrics"]).items()}
    if stage == "train":
        keys = ("steps", "tokens_trained", "seconds", "tokens_per_second")
        return {f"train_{k}": float(manifest[k]) for k in keys}
    return {}


def print_plan(cfg: RunConfig, planned: list[PlannedStage], out=None) -> None:
    out = out or sys.stdout
    print(f"run directory: {cfg.run_dir}", file=out)
    for stage in planned:
        target = cfg.run_dir / stage.name
        print(f"  {stage.name:<11} {stage.action:<7} {stage.reason:<34} -> {target}", file=out)
    for stage in planned:
        if stage.warning:
            print(f"ftpipe: warning: {stage.warning}", file=sys.stderr)


def print_summary(cfg: RunConfig, out=None) -> None:
    out = out or sys.stdout
    run_dir = RunDir(cfg.run_dir)
    metrics_file = run_dir.metrics_file
    if not metrics_file.is_file():
        return
    metrics = json.loads(metrics_file.read_text())
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "base"]
    base = metrics.get("base")
    print(f"\nheld-out metrics ({metrics_file}):", file=out)
    print(f"  {'metric':<14}" + (f"{'before':>12}" if base else "") + f"{'after':>12}", file=out)
    for key in keys:
        before = f"{base[key]:>12.4f}" if base and key in base else ""
        print(f"  {key:<14}{before}{metrics[key]:>12.4f}", file=out)
    print_lm_eval(metrics, out)
    print(f"model: {run_dir.model_dir}", file=out)


def print_lm_eval(metrics: dict[str, Any], out) -> None:
    """evaluate.lm_eval's scores, a line per task and metric, before (the base model) and after."""
    base = (metrics.get("base") or {}).get("lm_eval") or {}
    for task, scores in (metrics.get("lm_eval") or {}).items():
        for name, value in scores.items():
            before = base.get(task, {}).get(name)
            print(f"  lm_eval {task} {name}: " + (f"{before:.4g} -> " if before is not None else "")
                  + f"{value:.4g}", file=out)
