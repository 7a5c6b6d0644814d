"""Render docs/config.md from the pydantic config models: `python -m pipeline.docgen [--check]`."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config import RunConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
INTRO = """# Config reference

Generated from the pydantic models in `pipeline/config.py` by `python -m pipeline.docgen`; a test
fails when this file is stale. Keys are strict: an unknown key is an error that names it and
suggests the closest valid one. Any key can be overridden on the command line with its dotted name,
e.g. `ftpipe run cfg.yaml train.lr=1e-4 data.train=[a.jsonl,b.jsonl]`.
"""


def type_name(annotation: object) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return " \\| ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section defaults)" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    return "`null`" if field.default is None else f"`{field.default!r}`"


def constraints(field: FieldInfo) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min items", "pattern": "matches"}
    found = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{symbol} `{value}`" if attr == "pattern" else f"{symbol} {value}")
    return ", ".join(found)


def section_table(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | constraints | meaning |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _section_model(field) is None:
            rows.append(f"| `{prefix}{name}` | {type_name(field.annotation)} | {default_text(field)} | "
                        f"{constraints(field)} | {field.description or ''} |")
    return rows


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def render_config_reference() -> str:
    lines = [INTRO, "## top level", "", *section_table("", RunConfig), ""]
    for name, field in RunConfig.model_fields.items():
        model = _section_model(field)
        if model is not None:
            lines += [f"## {name}", "", *section_table(f"{name}.", model), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render_config_reference()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python -m pipeline.docgen", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
