"""One-line messages for config mistakes: where (file:line) and which key, with a suggestion."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A section of the run config: an unknown key in it is an error (with a suggestion), not ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

def describe_error(error: dict, path: Path | str, lines: dict, root: type[BaseModel],
                   tags: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error: file:line, the dotted key, what is wrong (tags left out)."""
    loc = tuple(str(p) for p in error["loc"] if p not in tags)
    dotted = ".".join(loc) or "config"
    where = f"{path}:{lines[loc]}" if loc in lines else str(path)
    if error["type"] == "extra_forbidden":
        hint = closest_key(root, loc)
        return f"{where}: unknown key '{dotted}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if error["type"] == "missing":
        return f"{where}: missing required key '{dotted}'"
    message = re.sub(r"^Value error, ", "", error["msg"])
    got = error.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    if not loc:
        return f"{where}: {message}"
    return f"{where}: {dotted}: {message}{shown}"


def closest_key(root: type[BaseModel], loc: tuple[str, ...]) -> str | None:
    """The valid key nearest to a misspelled one, as a dotted path; None when nothing is close."""
    model = root
    annotation: Any = None
    for index, part in enumerate(loc[:-1]):
        # A list index steps into the list's entries (the model among their alternatives).
        annotation = nested_model(annotation) if part.isdigit() else getattr(
            model.model_fields.get(part), "annotation", None)
        if loc[index + 1].isdigit():
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    return ".".join((*loc[:-1], match[0])) if match else None


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The first model inside a type, through lists, unions and Annotated wrappers."""
    pending = list(get_args(annotation))
    while pending:
        item = pending.pop(0)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
        pending += get_args(item)
    return None


def yaml_lines(text: str | None) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML text to its 1-based line, for error messages."""
    if not text:
        return {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    found: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*prefix, str(key.value))
                found[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                found[(*prefix, str(index))] = value.start_mark.line + 1
                walk(value, (*prefix, str(index)))

    walk(root, ())
    return found
