"""Running one stage in-process, as the runner would, for tests of a single stage."""

from pipeline.context import StageContext
from pipeline.run_dir import RunDir


def stage_context(cfg):
    run_dir = RunDir(cfg.run_dir)
    return StageContext(run_dir, progress=False)


def run_stage(stage, cfg, ctx):
    manifest = stage.run(cfg, ctx)
    manifest["run_id"] = "test"
    ctx.run_dir.write_manifest(stage.__name__.split(".")[-1], manifest)
    return manifest
