"""`ftpipe run | validate | plan | status | submit | cancel | logs | sync | export`: the command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import pipeline
from launch.process import DEBUG_ENV, quiet_libraries, reporting_errors
from launch.run_lock import holding, this_process
from pipeline.config import RunConfig, load_config
from pipeline.errors import UserError
from pipeline.run_dir import RunDir
from pipeline.secrets import warn_secret_setup
from pipeline.stages import NAMES, names

DEBUG_HELP = "show the traceback of an error too (also in torchrun ranks and SLURM jobs)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftpipe",
                                     description="Fine-tune Hugging Face models from one YAML file.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"ftpipe {pipeline.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (skipping stages that are up to date)")
    _config_args(run)
    _stage_args(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    validate = sub.add_parser("validate",
                              help="check the config and print the plan without running anything")
    _config_args(validate)
    validate.add_argument("--stages", help="comma-separated subset of stages")
    estimate = sub.add_parser("plan", help="check the config and estimate parameters, memory per GPU for "
                                           "each strategy, checkpoint size and time, reading no weights")
    _config_args(estimate)
    estimate.add_argument("--json", action="store_true", help="print the estimate as JSON")
    status = sub.add_parser("status",
                            help="show which stages of a run directory are done (and their SLURM jobs)")
    status.add_argument("run_dir", type=Path)
    submit = sub.add_parser("submit", help="submit one SLURM job per stage that is not up to date")
    _config_args(submit)
    _stage_args(submit)
    submit.add_argument("--dry-run", action="store_true",
                        help="write the sbatch scripts under RUN_DIR/slurm/dry-run/ and submit nothing")
    submit.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one train/consolidate/evaluate chain per value (combinations when repeated), "
                             "sharing one shard/tokenize")
    cancel = sub.add_parser("cancel", help="cancel the queued and running SLURM jobs of a run directory")
    cancel.add_argument("run_dir", type=Path)
    logs = sub.add_parser("logs", help="print the SLURM job logs (stdout, stderr) of a stage")
    logs.add_argument("run_dir", type=Path)
    logs.add_argument("stage", choices=NAMES)
    logs.add_argument("-f", "--follow", action="store_true",
                      help="print what the stage's job writes as it writes it, until the job ends")
    report = sub.add_parser("report", help="write RUN_DIR/report/report.html: one self-contained page with "
                                           "the run's plots, metrics, samples, rejects and manifests")
    report.add_argument("run_dir", type=Path)
    sync = sub.add_parser("sync", help="send the tracking data a run could not send (RUN_DIR/tracking/spool) "
                                       "to MLflow; safe to repeat")
    sync.add_argument("run_dir", type=Path)
    export = sub.add_parser("export", help="turn a complete training checkpoint into a verified Hugging Face "
                                           "model folder")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--step", type=int, required=True, help="the checkpoint's training step")
    export.add_argument("--out", type=Path, required=True, help="a new or empty folder to write")
    for command in sub.choices.values():  # `ftpipe run cfg.yaml --debug` as well as `ftpipe --debug run`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE", help="config overrides")


def _stage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="delete STAGE's results and redo it (and what depends on it); repeatable")


def _load(args: argparse.Namespace) -> RunConfig:
    from pipeline.preflight import check_inputs

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    return cfg


def _stages(args: argparse.Namespace) -> list[str] | None:
    return [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None


def cmd_run(args: argparse.Namespace) -> int:
    from launch.local import print_plan, print_summary, run_pipeline
    from pipeline.runner import plan

    cfg = _load(args)
    # A dry run writes nothing: it needs no lock and works beside a running writer.
    with contextlib.nullcontext() if args.dry_run else holding(RunDir(cfg.run_dir.resolve()), this_process()):
        planned = plan(cfg, _stages(args), tuple(args.force))
        print_plan(cfg, planned)
        if args.dry_run:
            return 0
        # Progress bars for a terminal; a log file (SLURM, nohup, CI) gets one line per logged step instead.
        run_pipeline(cfg, planned, progress=not args.no_progress and sys.stderr.isatty())
    print_summary(cfg)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from launch.local import print_plan
    from pipeline.runner import plan

    cfg = _load(args)
    print(f"{args.config}: config is valid")
    if cfg.launch.backend == "slurm":
        warn_secret_setup(cfg.launch.slurm.setup)
    elif cfg.train.precision == "bf16":  # training runs on this machine: say now what bf16 costs here
        from pipeline.precision import precision_warning

        if warning := precision_warning(cfg.train):
            print(f"ftpipe: warning: {warning}", file=sys.stderr)
    print_plan(cfg, plan(cfg, _stages(args)))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from pipeline.footprint import finished_run, footprint, format_footprint

    cfg = _load(args)
    tokenized = RunDir(cfg.run_dir).read_manifest("tokenize")
    rows = tokenized["splits"]["train"]["rows"] if tokenized else None
    estimate = footprint(cfg, rows, finished_run(cfg))
    print(json.dumps(estimate, indent=2) if args.json else format_footprint(cfg, estimate))
    return 0


def _run_dir(path: Path) -> RunDir:
    run_dir = RunDir(path)
    if not run_dir.config_file.is_file():
        raise UserError(f"{path}: not a run directory (no config.yaml)")
    return run_dir


# `ftpipe status` exit codes, for scripts that poll a run: done, a stage failed, jobs queued or running,
# not done and nothing queued (run or submit again).
STATUS_DONE, STATUS_FAILED, STATUS_ACTIVE, STATUS_INCOMPLETE = 0, 1, 3, 4


def cmd_status(args: argparse.Namespace) -> int:
    from launch.slurm_jobs import stage_states
    from launch.sweep import read_sweep, summary_rows, summary_table

    run_dir = _run_dir(args.run_dir)
    members = read_sweep(run_dir)
    shared = len(names("shared_by_sweep"))
    if run_dir.jobs_file.is_file():  # a sweep's base run does only the shared stages itself
        rows = stage_states(run_dir)[:shared if members else None]
        print("\n".join(f"  {stage:<11} {state:<24} {ids}".rstrip() for stage, state, ids in rows))
    else:
        rows = _local_states(run_dir)
        print("\n".join(f"  {stage:<11} {state:<8} {detail}".rstrip() for stage, state, detail in rows))
    states = [state for _, state, _ in rows]
    if members:
        print("\nsweep:\n" + summary_table(summary_rows(run_dir)), end="")
        for member in members:
            states += [state for _, state, _ in _states(RunDir(Path(member.run_dir)))[shared:]]
    return status_code(states)


def _states(run_dir: RunDir) -> list[tuple[str, str, str]]:
    from launch.slurm_jobs import stage_states

    return stage_states(run_dir) if run_dir.jobs_file.is_file() else _local_states(run_dir)


def _local_states(run_dir: RunDir) -> list[tuple[str, str, str]]:
    rows = []
    for name in NAMES:
        manifest = run_dir.read_manifest(name)
        state = "done" if manifest else ("partial" if run_dir.stage(name).exists() else "pending")
        rows.append((name, state, f"{manifest['wall_seconds']:.1f}s" if manifest else ""))
    return rows


def status_code(states: list[str]) -> int:
    """A failure anywhere first (a poller should stop), then jobs still going, then work left to start."""
    def kind(state: str) -> int:
        if state == "done":
            return STATUS_DONE
        if state.startswith(("queued", "running")):
            return STATUS_ACTIVE
        return STATUS_INCOMPLETE if state.startswith(("pending", "partial", "stopped")) else STATUS_FAILED
    kinds = {kind(state) for state in states}
    for code in (STATUS_FAILED, STATUS_ACTIVE, STATUS_INCOMPLETE):
        if code in kinds:
            return code
    return STATUS_DONE


def cmd_submit(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg.launch.backend != "slurm":
        raise UserError(f"{args.config}: ftpipe submit needs launch.backend: slurm "
                        f"(it is {cfg.launch.backend!r})")
    warn_secret_setup(cfg.launch.slurm.setup)
    if args.sweep and args.stages:
        raise UserError("--stages does not combine with --sweep (a sweep submits every stage)")
    from launch.slurm import check_idle, submitting

    run_dir = RunDir(cfg.run_dir.resolve())
    check_idle(run_dir)  # before the lock, which a running job holds: this line also names the queued ones
    with submitting(run_dir):
        return _submit_sweep(args, cfg) if args.sweep else _submit(args, cfg)


def _submit(args: argparse.Namespace, cfg: RunConfig) -> int:
    from launch import slurm
    from launch.local import print_plan
    from pipeline.runner import claim_forced, plan

    planned = plan(cfg, _stages(args), tuple(args.force))
    print_plan(cfg, planned)
    stages = slurm.to_submit(planned)
    if args.dry_run:
        for path in slurm.dry_run(cfg, stages, Path.cwd()):
            print(f"would submit: {path}")
        return 0
    if not stages:
        print("every stage is up to date; nothing submitted")
        return 0
    claim_forced(cfg, planned)
    _print_jobs(slurm.submit(cfg, stages, Path.cwd()))
    print(f"follow with: ftpipe status {cfg.run_dir}")
    return 0


def _print_jobs(jobs: list, label: str = "") -> None:
    for job in jobs:
        after = f" after array {job.array_job_id}" if job.array_job_id else ""
        print(f"submitted {label}{job.stage:<11} job {job.job_id}{after}  log {job.stdout}")


def _submit_sweep(args: argparse.Namespace, cfg: RunConfig) -> int:
    from launch.sweep import members, submit_sweep

    found = members(args.config, args.overrides, args.sweep)
    for member, _ in found:
        print(f"member {member.name}: {' '.join(member.overrides)}")
    if args.dry_run:
        return 0
    submitted = submit_sweep(cfg, found, Path.cwd(), tuple(args.force))
    _print_jobs(submitted["data_jobs"])
    for name, jobs in submitted["chains"].items():
        _print_jobs(jobs, f"{name} ")
    print(f"submitted sweep summary job {submitted['summary_job']}")
    print(f"follow with: ftpipe status {cfg.run_dir}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from launch.slurm_jobs import cancel
    from launch.sweep import cancel_sweep, read_sweep

    run_dir = _run_dir(args.run_dir)
    jobs = cancel(run_dir) + (cancel_sweep(run_dir) if read_sweep(run_dir) else [])
    for job in jobs:
        print(f"cancelled {job.stage:<11} job {job.job_id}")
    if not jobs:
        print("no queued or running jobs")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from launch.slurm_jobs import follow, log_files

    if args.follow:
        follow(_run_dir(args.run_dir), args.stage, lambda text: print(text, end="", flush=True))
        return 0
    files = log_files(_run_dir(args.run_dir), args.stage)
    if not files:
        print(f"no log files yet for {args.stage}")
    for path in files:
        print(f"==> {path} <==")
        print(path.read_text(errors="replace"), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    written = write_report(_run_dir(args.run_dir))
    print(f"wrote {written[-1]} ({len(written) - 1} plots, also as PNG files beside it)")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from pipeline.secrets import redact
    from pipeline.tracking import tracking_uri
    from pipeline.tracking_spool import replay, spool_files

    run_dir = _run_dir(args.run_dir)
    if not spool_files(run_dir.spool_dir):
        print(f"nothing to send: {run_dir.spool_dir} holds no unsent tracking data")
        return 0
    uri = tracking_uri(load_config(run_dir.config_file), run_dir)
    try:
        sent, refused = replay(run_dir.spool_dir, uri)
    except ConnectionError as err:
        raise UserError(f"{err}; nothing was lost, run `ftpipe sync {args.run_dir}` again later") from None
    refusals = f"; MLflow refused {refused} (warnings above)" if refused else ""
    print(f"sent {sent} tracking records to {redact(uri)}{refusals}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export

    report = export(_run_dir(args.run_dir), args.step, args.out)
    print(f"exported {report['checkpoint']} to {args.out}: {report['mode']} model, {report['dtype']}, "
          f"verified {report['verify']}")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan, "status": cmd_status,
            "submit": cmd_submit, "cancel": cmd_cancel, "logs": cmd_logs, "sync": cmd_sync,
            "report": cmd_report, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`run cfg.yaml --no-progress train.lr=1e-4`).
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    quiet_libraries()
    return reporting_errors(lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
