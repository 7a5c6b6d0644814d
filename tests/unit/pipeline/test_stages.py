"""pipeline/stages.py is the one place a stage is declared: entry points resolve, code lists cover
what each stage imports, and no other module keeps its own list of stage names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import NAMES, PLUMBING, STAGES, module_path, names

REPO = Path(__file__).resolve().parents[3]


def _imported_modules(module: str) -> set[str]:
    """Package modules `module` imports anywhere in its file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(module_path(module).read_text())):
        candidates = []
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found |= {name for name in candidates if name.split(".")[0] == "pipeline" and _exists(name)}
    return found | {parent for name in found for parent in _packages_above(name)}


def _packages_above(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _exists(module: str) -> bool:
    return module_path(module).is_file()


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_imported_modules(current))
    return seen


@pytest.mark.parametrize("name", NAMES)
def test_entry_point_resolves_and_code_list_covers_what_it_imports(name):
    stage = STAGES[name]
    module, _, function = stage.entry.partition(":")
    assert callable(getattr(__import__(module, fromlist=[function]), function))
    imported = _closure(module)
    missing = sorted(imported - set(stage.code) - set(PLUMBING))
    assert not missing, f"{name}: code list misses {missing}: a change there would not redo the stage"
    extra = sorted(set(stage.code) - imported)
    assert not extra, f"{name}: code list names {extra}, which the stage never imports (needless reruns)"


@pytest.mark.parametrize("name", names("units"))
def test_unit_wise_stages_resolve_to_a_unit_stage(name):
    from pipeline.units import UnitStage

    assert isinstance(STAGES[name].unit_stage(), UnitStage)


def test_inputs_are_earlier_stages():
    for index, name in enumerate(NAMES):
        assert set(STAGES[name].inputs) <= set(NAMES[:index]), name


def test_a_change_in_a_module_the_stage_reads_changes_its_code_version(tmp_path, monkeypatch):
    import pipeline.stages

    before = STAGES["consolidate"].code_version()
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline")
    monkeypatch.setattr(pipeline.stages, "PACKAGE_ROOT", tmp_path)
    assert STAGES["consolidate"].code_version() == before
    with open(tmp_path / "pipeline" / "hf_writer.py", "a") as writer:  # consolidate's list once missed it
        writer.write("# changed\n")
    assert STAGES["consolidate"].code_version() != before


def _stage_name_collections(path: Path) -> list[int]:
    """Lines holding a tuple/list/set/dict literal with two or more stage names in it."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and items:
            named = [i for i in items if isinstance(i, ast.Constant) and i.value in NAMES]
            if len(named) >= 2:
                lines.append(node.lineno)
    return lines


def test_no_list_of_stage_names_outside_the_declarations():
    sources = [p for pkg in ("pipeline", "launch") for p in (REPO / pkg).rglob("*.py")
               if p != module_path("pipeline.stages")]
    found = {str(p.relative_to(REPO)): lines for p in sources if (lines := _stage_name_collections(p))}
    assert not found, f"stage names listed outside pipeline/stages.py: {found}"


def test_declarations_and_planning_import_neither_torch_nor_transformers():
    code = ("import sys, pipeline.stages, pipeline.runner, launch.slurm_jobs\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_speed_settings_leave_the_train_fingerprint_alone(tmp_path, model_dir):
    """train.fused_loss and train.compile compute the same numbers faster: changing them, or a run from
    before they existed, resumes instead of asking for --force."""
    from pipeline.config import validate_config
    from pipeline.digests import DigestCache
    from pipeline.stages import train_inputs
    from tests.fixtures import causal_config

    def inputs(**train) -> dict:
        cfg = validate_config(causal_config(tmp_path, model_dir, tmp_path / "data.jsonl", train=train))
        return train_inputs(cfg, DigestCache(tmp_path / "digests.json"))

    assert inputs() == inputs(fused_loss="off", compile=True)
    assert inputs() != inputs(lr=0.5)
