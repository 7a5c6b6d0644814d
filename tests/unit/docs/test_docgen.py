"""docs/config.md is generated from the config models: it must be current, complete and runnable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from docs import docgen
from pipeline.config import RunConfig, validate_config

REGENERATE = "python docs/docgen.py"


def doc_text() -> str:
    return docgen.DOC_PATH.read_text(encoding="utf-8")


def dotted_keys() -> list[str]:
    keys = []
    for prefix, model, _ in docgen.sections():
        keys += [f"{prefix}{name}" for name, field in model.model_fields.items()
                 if docgen.section_model(field) is None]
    return keys


def example_block(text: str) -> str:
    blocks = re.findall(r"^```yaml\n(.*?)^```$", text, flags=re.S | re.M)
    assert len(blocks) == 1, "docs/config.md should hold exactly one ```yaml example block"
    return blocks[0]


def test_doc_is_up_to_date():
    assert doc_text() == docgen.render_config_reference(), f"docs/config.md is stale: run {REGENERATE}"


def test_sections_are_discovered_from_annotations():
    prefixes = [prefix for prefix, _, _ in docgen.sections()]
    nested = [f"{name}." for name, field in RunConfig.model_fields.items()
              if docgen.section_model(field) is not None]
    assert prefixes[: len(nested) + 1] == ["", *nested] and len(nested) >= 6
    # Sections inside sections (and optional ones) are found too.
    assert {"model.lora.", "train.deepspeed.", "train.fsdp.", "train.freeze."} <= set(prefixes)


def test_every_field_has_a_row():
    text = doc_text()
    for key in dotted_keys():
        assert re.search(rf"^\| `{re.escape(key)}` \|", text, flags=re.M), f"{key} is not documented"
    assert "`data.eval_fraction` | float | `0.1` | >= 0.0, < 1.0 |" in text
    assert '`model.task` | "causal_lm" \\| "sequence_classification" |' in text
    assert "`data.eval` | list[str \\| SourceSpec] | `[]` |" in text
    assert "`name` | str | required |" in text


def test_every_table_row_has_five_cells():
    for line in doc_text().splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            assert len(cells) == 5, line


def test_example_yaml_is_complete_and_validates():
    raw = yaml.safe_load(example_block(doc_text()))
    cfg = validate_config(raw, "docs/config.md")
    assert cfg.train.lr == RunConfig.model_fields["train"].default_factory().lr
    flat = {".".join(p) for p in _paths(raw)}
    assert flat == set(dotted_keys())


def _paths(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for key, value in node.items():
        # an empty mapping (data.role_map: {}) is a value, not a section
        found += _paths(value, (*prefix, key)) if isinstance(value, dict) and value else [(*prefix, key)]
    return found


def test_check_passes_on_the_repo_copy():
    result = subprocess.run([sys.executable, "docs/docgen.py", "--check"],
                            cwd=docgen.REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("edit", [lambda t: t.replace("Peak learning rate", "Learning rate"),
                                  lambda t: t + "\n"])
def test_check_fails_on_a_stale_copy(tmp_path: Path, capsys, edit):
    stale = tmp_path / "config.md"
    stale.write_text(edit(docgen.render_config_reference()), encoding="utf-8")
    assert docgen.main(["--check"], path=stale) == 1
    message = capsys.readouterr().err.strip()
    assert "stale" in message and REGENERATE in message and "\n" not in message


def test_check_fails_on_a_missing_file(tmp_path: Path, capsys):
    assert docgen.main(["--check"], path=tmp_path / "absent.md") == 1
    assert "missing" in capsys.readouterr().err


def test_generate_then_check(tmp_path: Path):
    target = tmp_path / "docs" / "config.md"
    assert docgen.main([], path=target) == 0
    assert docgen.main(["--check"], path=target) == 0
    assert target.read_text(encoding="utf-8") == doc_text()
