"""`ftpipe submit CONFIG --sweep train.lr=1e-5,3e-5 [--sweep KEY=...]`: one train -> consolidate ->
evaluate chain per combination of values, all after one shard/tokenize of the base run.

Each member is a run directory of its own (`<output_dir>/<name>-<key><value>`) whose shard/ and
tokenize/ are links to the base run's, so planning sees the shared data as done and reuses it.
In MLflow the base run is the parent; each member is a parent nested under it, holding its stages.
A summary job (after all members, failed or not) tabulates their eval metrics into
`<base run>/sweep/summary.{json,md}` and the base run's MLflow record; `ftpipe status` shows the
same table at any time.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import submitit

from launch.run_lock import holding, this_job, this_process
from launch.slurm import parent_run, submit, submit_job, to_submit
from launch.slurm_arrays import enter_job
from launch.slurm_jobs import JobRecord, cancel, cancel_jobs
from pipeline import plots
from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError
from pipeline.report import sweep_members
from pipeline.run_dir import RunDir, atomic_write_json, atomic_write_text
from pipeline.runner import claim_forced, fingerprinted, plan
from pipeline.stages import LAST, names
from pipeline.tracking import build_tracker, read_parent

SHARED_STAGES = names("shared_by_sweep")
MEMBER_STAGES = names("shared_by_sweep", False)


@dataclass(frozen=True)
class Member:
    name: str
    overrides: list[str]
    run_dir: str


def combinations(sweeps: list[str]) -> list[list[str]]:
    """['train.lr=1e-5,3e-5', 'train.seed=0,1'] -> every combination, as override lists."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not listed:
            raise UserError(f"--sweep {item!r}: expected KEY=VALUE1,VALUE2,... (e.g. train.lr=1e-5,3e-5)")
        axes.append([f"{key}={value}" for value in listed])
    return [list(combo) for combo in itertools.product(*axes)]


def member_name(base: str, overrides: list[str]) -> str:
    pairs = (o.partition("=") for o in overrides)
    slug = "-".join(f"{key.rsplit('.', 1)[-1]}{value}" for key, _, value in pairs)
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{base}-{slug}")


def members(config: Path, overrides: list[str], sweeps: list[str]) -> list[tuple[Member, RunConfig]]:
    """The members' configs, each checked to share the base run's shard and tokenize outputs."""
    base = load_config(config, overrides)
    shared = _data_fingerprints(base)
    found = []
    for combo in combinations(sweeps):
        cfg = load_config(config, [*overrides, *combo, f"name={member_name(base.name, combo)}"])
        if _data_fingerprints(cfg) != shared:
            raise UserError(f"--sweep {' '.join(combo)}: changes the data (shard or tokenize inputs); a "
                            "sweep shares one tokenized dataset, so sweep keys of train, evaluate or the "
                            "model's weights")
        found.append((Member(cfg.name, combo, str(cfg.run_dir.resolve())), cfg))
    return found


def _data_fingerprints(cfg: RunConfig) -> dict[str, str]:
    return {spec.name: fp for spec, fp, _ in fingerprinted(cfg) if spec.name in SHARED_STAGES}


def link_shared_data(base: RunDir, member: RunDir) -> None:
    """member/shard and member/tokenize -> the base run's (relative links: the output dir may move)."""
    member.root.mkdir(mode=0o750, parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        link, target = member.stage(stage), base.stage(stage)
        if link.exists() and not link.is_symlink():
            raise UserError(
                f"{link} exists and is not a link to {target}: remove it or name the sweep differently")
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(target, member.root), target_is_directory=True)


def submit_sweep(base: RunConfig, found: list[tuple[Member, RunConfig]], cwd: Path,
                 force: tuple[str, ...]) -> dict[str, Any]:
    """Shared data jobs once, then each member's chain after them, then the summary job."""
    base_plan = plan(base, None, tuple(f for f in force if f in SHARED_STAGES))
    data_stages = [s for s in to_submit(base_plan) if s in SHARED_STAGES]
    claim_forced(base, base_plan)
    data_jobs = submit(base, data_stages, cwd) if data_stages else []
    parent = parent_run(base)
    after = data_jobs[-1].job_id if data_jobs else None
    chains: dict[str, list[JobRecord]] = {}
    for member, cfg in found:
        member_dir = RunDir(cfg.run_dir.resolve())
        with holding(member_dir, this_process()):  # its links too are its own to write
            link_shared_data(RunDir(base.run_dir.resolve()), member_dir)
            member_plan = plan(cfg, list(MEMBER_STAGES), tuple(f for f in force if f not in SHARED_STAGES),
                               upstream_submitted=True)
            stages = to_submit(member_plan)
            claim_forced(cfg, member_plan)
            chains[member.name] = submit(cfg, stages, cwd, after=after, parent_of=parent) if stages else []
    ends = [jobs[-1].job_id for jobs in chains.values() if jobs]
    # The summary job asks for what the last stage's job gets (no GPU, one node).
    summary = submit_job(base, LAST, SweepSummary(str(base.run_dir.resolve()), str(cwd)),
                          ":".join(ends) or None, lambda executor, fn: executor.submit(fn), kind="afterany")
    record = {"members": [asdict(m) for m, _ in found], "summary_job": summary.job_id}
    atomic_write_json(RunDir(base.run_dir).sweep_file, record)
    return {"data_jobs": data_jobs, "chains": chains, "summary_job": summary.job_id}


class SweepSummary(submitit.helpers.Checkpointable):
    """The summary job: tabulate, record in MLflow, end the sweep's parent run."""

    def __init__(self, base_dir: str, cwd: str):
        self.base_dir, self.cwd = base_dir, cwd

    def __call__(self) -> str:
        base_dir = Path(self.base_dir)
        cfg = enter_job(base_dir, Path(self.cwd))
        with holding(RunDir(base_dir), this_job()):
            return write_summary(RunDir(base_dir), cfg)


def read_sweep(base_dir: RunDir) -> list[Member]:
    if not base_dir.sweep_file.is_file():
        return []
    return [Member(**m) for m in json.loads(base_dir.sweep_file.read_text())["members"]]


def summary_rows(base_dir: RunDir) -> list[dict[str, Any]]:
    """Per member: its overrides, how far it got, its scalar eval metrics."""
    from pipeline.evaluate import scalar_metrics

    rows = []
    for member in read_sweep(base_dir):
        run = RunDir(Path(member.run_dir))
        done = [s for s in MEMBER_STAGES if run.read_manifest(s) is not None]
        metrics_file = run.metrics_file
        metrics = scalar_metrics(json.loads(metrics_file.read_text())) if metrics_file.is_file() else {}
        state = "done" if len(done) == len(MEMBER_STAGES) else f"{done[-1]} done" if done else "not done"
        rows.append({"name": member.name, "overrides": " ".join(member.overrides), "state": state,
                     "metrics": metrics})
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for row in rows for k in row["metrics"]})
    lines = ["| member | overrides | state | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for row in rows:
        values = [f"{row['metrics'][k]:.4f}" if k in row["metrics"] else "" for k in keys]
        lines.append(f"| {row['name']} | {row['overrides']} | {row['state']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def write_summary(base_dir: RunDir, cfg: RunConfig) -> str:
    """summary.md into the sweep's MLflow parent (then ended), and summary.{json,md} written last."""
    rows = summary_rows(base_dir)
    table = summary_table(rows)
    folder = base_dir.sweep_dir
    atomic_write_text(folder / "summary.md", table)
    tracker = build_tracker(cfg)
    parent = read_parent(base_dir, tracker.uri) if tracker else None
    pictures = plots.sweep_comparison(sweep_members(base_dir), folder) if cfg.tracking.report else None
    if tracker and parent:
        tracker.start({}, {}, attach_to=parent)
        tracker.log_artifact(folder / "summary.md", "sweep")
        if pictures:
            tracker.log_artifact(pictures, "sweep")
        tracker.close("FINISHED" if all(r["state"] == "done" for r in rows) else "FAILED")
    atomic_write_json(folder / "summary.json", rows)
    print(table)
    return table


def cancel_sweep(base_dir: RunDir) -> list[JobRecord]:
    """Cancel every member's queued and running jobs and the summary job."""
    jobs = [job for member in read_sweep(base_dir) for job in cancel(RunDir(Path(member.run_dir)))]
    summary = JobRecord("summary", str(json.loads(base_dir.sweep_file.read_text())["summary_job"]), "", "")
    return jobs + cancel_jobs([summary])
