"""`ftpipe export RUN_DIR --step N --out DIR`: any complete training checkpoint -> a verified
Hugging Face model folder, through the consolidate stage's own writer and checks.

The run's consolidate/ folder belongs to the stage (its manifest vouches for what is there), so an
export never writes into it; DIR must be new or empty, and appears whole or not at all. The final
checkpoint is checked as consolidate checks it (logits against train/verify.pt); an earlier one has
no logits recorded, so every written tensor is compared with the checkpoint's and a forward pass
must give finite logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import load_config
from pipeline.consolidate import with_run_labels, write_verified
from pipeline.errors import UserError
from pipeline.precision import as_trained
from pipeline.run_dir import RunDir
from pipeline.train.checkpoint import complete_step


def export(run_dir: RunDir, step: int, out: Path) -> dict[str, Any]:
    cfg = with_run_labels(as_trained(load_config(run_dir.config_file), run_dir), run_dir)
    checkpoint = complete_step(run_dir.stage("train") / "checkpoints", step, f"--step {step}")
    check_out(out, run_dir)
    final = (run_dir.read_manifest("train") or {}).get("final_checkpoint")
    is_final = final is not None and (run_dir.stage("train") / final).resolve() == checkpoint.resolve()
    verify_file = run_dir.stage("train") / "verify.pt" if is_final else None
    report = write_verified(cfg, checkpoint, out, verify_file, run_dir)
    return {"checkpoint": str(checkpoint.relative_to(run_dir.root)), "step": step, "final": is_final,
            **report}


def check_out(out: Path, run_dir: RunDir) -> None:
    """A new or empty folder outside the run's consolidate/ folder."""
    owned = run_dir.stage("consolidate").resolve()
    target = out.resolve()
    if target == owned or owned in target.parents:
        raise UserError(f"--out: {out} is inside {run_dir.stage('consolidate')}, which only the consolidate "
                        "stage writes; choose a folder outside it")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out: {out} exists and is not an empty folder; give a new or empty one")
