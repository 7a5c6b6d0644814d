"""Render docs/config.md from the pydantic config models: `python docs/docgen.py [--check]`.

A repository tool, not part of the installed package."""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config import RunConfig
from pipeline.config_errors import nested_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "config.md"
REGENERATE = "python docs/docgen.py"

INTRO = f"""# Config reference

This file is generated from the pydantic models in `pipeline/config.py`; do not edit it by hand.
Regenerate it with `{REGENERATE}`; `{REGENERATE} --check` exits 1 when it is
stale. Config keys are strict: an unknown key is an error that names it and suggests the closest
valid key. Any key can be overridden on the command line as `key.sub=value` with its dotted name, e.g.
`train.lr=1e-4` or `data.train=[a.jsonl,b.jsonl]`; values are parsed as YAML."""

# Values for required keys in the example; other required keys get a placeholder by type.
PLACEHOLDERS: dict[str, object] = {
    "name": "my-run",
    "model.name_or_path": "path/to/model-or-hub-id",
    "data.train": ["path/to/train.jsonl"],
}

CONSTRAINTS: dict[str, str] = {
    "ge": ">=", "gt": ">", "le": "<=", "lt": "<", "multiple_of": "multiple of",
    "min_length": "min length", "max_length": "max length", "pattern": "matches",
}

# --- values and types ------------------------------------------------------------------------


def yaml_value(value: object) -> str:
    """A value as a YAML flow scalar/sequence/mapping (JSON, except floats and null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _yaml_float(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_value(str(k))}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        return yaml_value(value.model_dump(mode="json"))
    return json.dumps(value) if isinstance(value, str) else str(value)


def _yaml_float(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    mantissa, sep, exponent = text.partition("e")
    if sep and "." not in mantissa:  # YAML 1.1 reads 5e-05 as a string, 5.0e-05 as a float
        text = f"{mantissa}.0e{exponent}"
    return text


def type_name(annotation: object) -> str:
    """A readable type: str, list[str], str | null, "a" | "b" (pipes unescaped)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is None or annotation is type(None):
        return "null"
    if origin is typing.Annotated:  # tags, discriminators: how pydantic parses, not what to write
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(yaml_value(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The nested model a field holds (also when optional: `Model | None`), or None for a plain key."""
    candidates = typing.get_args(field.annotation) or (field.annotation,)
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if models else None


def item_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model a list's entries may be (`list[str | Model]`), documented as a table of its own."""
    if typing.get_origin(field.annotation) is not list:
        return None
    return nested_model(field.annotation)


def default_value(field: FieldInfo) -> object:
    """The field's default (default_factory called), or PydanticUndefined when required."""
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def default_text(field: FieldInfo) -> str:
    value = default_value(field)
    if value is PydanticUndefined:
        return "required"
    return f"`{yaml_value(value)}`"


def constraints_text(field: FieldInfo) -> str:
    found = []
    for item in field.metadata:
        for attr, label in CONSTRAINTS.items():
            value = getattr(item, attr, None)
            if value is None:
                continue
            shown = f"`{value}`" if attr == "pattern" else yaml_value(value)
            found.append(f"{label} {shown}")
    return ", ".join(found)


# --- markdown --------------------------------------------------------------------------------


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sections() -> Iterator[tuple[str, type[BaseModel], FieldInfo | None]]:
    """(dotted prefix, model, field holding it) for RunConfig and every nested section model."""
    pending: list[tuple[str, type[BaseModel], FieldInfo | None]] = [("", RunConfig, None)]
    while pending:
        prefix, model, holder = pending.pop(0)
        yield prefix, model, holder
        for name, field in model.model_fields.items():
            nested = section_model(field)
            if nested is not None:
                pending.append((f"{prefix}{name}.", nested, field))


def table(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if section_model(field) is None:
            cells = [f"`{prefix}{name}`", type_name(field.annotation), default_text(field),
                     constraints_text(field), field.description or ""]
            rows.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return rows


def section_intro(holder: FieldInfo) -> str:
    value = default_value(holder)
    if value is PydanticUndefined:
        text = "Required section."
    elif isinstance(value, BaseModel) and value == type(value)():
        text = "Optional section: when it is left out, every key takes its default."
    else:
        text = f"Optional section; default: {default_text(holder)}."
    return f"{text} {holder.description}" if holder.description else text


def render_section(prefix: str, model: type[BaseModel], holder: FieldInfo | None) -> list[str]:
    lines = (["## top level", ""] if holder is None
             else [f"## {prefix.rstrip('.')}", "", section_intro(holder), ""])
    lines += [*table(prefix, model), ""]
    for name, field in model.model_fields.items():
        entry = item_model(field)
        if entry is not None:
            lines += [f"## {prefix}{name}[] entries", "",
                      f"An entry of `{prefix}{name}` is a string, or a mapping with these keys:", "",
                      *table(f"{prefix}{name}[].", entry), ""]
    return lines


# --- example ---------------------------------------------------------------------------------


def placeholder(key: str, field: FieldInfo) -> object:
    if key in PLACEHOLDERS:
        return PLACEHOLDERS[key]
    kind = type_name(field.annotation)
    return ["CHANGE-ME"] if kind.startswith("list") else "CHANGE-ME"


def example_lines(prefix: str, model: type[BaseModel], indent: str = "") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key, nested = f"{prefix}{name}", section_model(field)
        if nested is not None:
            lines += [f"{indent}{name}:", *example_lines(f"{key}.", nested, indent + "  ")]
            continue
        value = default_value(field)
        required = value is PydanticUndefined
        shown = yaml_value(placeholder(key, field) if required else value)
        lines.append(f"{indent}{name}: {shown}" + ("  # required" if required else ""))
    return lines


def example_yaml() -> str:
    return "\n".join(example_lines("", RunConfig))


def render_config_reference() -> str:
    lines = [INTRO, ""]
    for prefix, model, holder in sections():
        lines += render_section(prefix, model, holder)
    lines += ["## example", "",
              "Every key at its default; replace the values marked `# required`.", "",
              "```yaml", example_yaml(), "```"]
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------------


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def stale_message(path: Path = DOC_PATH) -> str | None:
    """A one-line message when `path` differs from the rendered reference, else None."""
    try:
        current = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        current = None
    if current == render_config_reference():
        return None
    state = "is missing" if current is None else "is stale"
    return f"{_shown(path)} {state}: regenerate it with `{REGENERATE}`"


def write(path: Path = DOC_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_config_reference(), encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None, path: Path = DOC_PATH) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Write docs/config.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    args = parser.parse_args(argv)
    if args.check:
        message = stale_message(path)
        if message:
            print(message, file=sys.stderr)
            return 1
        return 0
    write(path)
    print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
