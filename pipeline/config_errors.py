"""One-line messages for config mistakes: where (file:line) and which key, with a suggestion."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, field_validator

from pipeline.errors import UserError


class Section(BaseModel):
    """A section of the run config: an unknown key in it is an error (with a suggestion), not ignored."""

    # inf and nan pass `gt`/`le` bounds (nan compares false) and would fail hours later, if at all.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # Every path API refuses a NUL byte with a ValueError, at whichever stage first opens the path.
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, str) and "\0" in item for item in items):
            raise ValueError("must not contain a NUL character")
        return value

# Names users bring from HF TrainingArguments, TRL, axolotl and LLaMA-Factory: key -> (ours, whose name).
_HF, _AX, _LF = "HF TrainingArguments", "axolotl", "LLaMA-Factory"
_ELSEWHERE = {
    "learning_rate": ("train.lr", f"{_HF}, {_AX}"), "lr": ("train.lr", ""),
    "gradient_accumulation_steps": ("train.grad_accum", f"{_HF}, {_AX}"),
    "per_device_train_batch_size": ("train.micro_batch_size", _HF),
    "micro_batch_size": ("train.micro_batch_size", ""),
    "per_device_eval_batch_size": ("evaluate.batch_size", _HF),
    "eval_batch_size": ("evaluate.batch_size", _AX),
    "num_train_epochs": ("train.epochs", _HF), "num_epochs": ("train.epochs", _AX),
    "epochs": ("train.epochs", ""),
    "max_steps": ("train.max_steps", ""), "warmup_ratio": ("train.warmup_ratio", ""),
    "warmup_steps": ("train.warmup_ratio (a share of the steps)", f"{_HF}, {_AX}"),
    "weight_decay": ("train.weight_decay", ""), "max_grad_norm": ("train.max_grad_norm", ""),
    "seed": ("train.seed", ""), "bf16": ("train.precision: bf16", f"{_HF}, {_AX}"),
    "gradient_checkpointing": ("train.activation_checkpointing", f"{_HF}, {_AX}"),
    "save_steps": ("train.checkpoint_every", _HF), "save_total_limit": ("train.keep_last", _HF),
    "logging_steps": ("train.log_every", f"{_HF}, {_AX}"),
    "deepspeed": ("train.deepspeed.config", f"{_HF}, {_AX}"),
    "model_name_or_path": ("model.name_or_path", f"{_HF}, {_LF}"),
    "base_model": ("model.name_or_path", _AX),
    "sequence_len": ("data.max_seq_len", _AX), "max_seq_length": ("data.max_seq_len", "TRL"),
    "cutoff_len": ("data.max_seq_len", _LF), "sample_packing": ("data.packing", _AX),
    "packing": ("data.packing", ""), "datasets": ("data.train", _AX), "dataset": ("data.train", _LF),
    "val_set_size": ("data.eval_fraction", _AX), "lora_r": ("model.lora.r", _AX),
    "lora_rank": ("model.lora.r", _LF), "lora_alpha": ("model.lora.alpha", _AX),
    "lora_dropout": ("model.lora.dropout", _AX), "lora_target_modules": ("model.lora.target_modules", _AX),
    "lora_target": ("model.lora.target_modules", _LF),
}
FOREIGN_KEYS = {key: f"ftpipe's key is '{ours}'" + (f"; '{key}' is what {theirs} call it" if theirs else "")
                for key, (ours, theirs) in _ELSEWHERE.items()}


def describe_error(error: dict, path: Path | str, lines: dict, root: type[BaseModel],
                   tags: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error: file:line, the dotted key, what is wrong (tags left out)."""
    loc = tuple(str(p) for p in error["loc"] if p not in tags)
    dotted = ".".join(loc) or "config"
    where = f"{path}:{lines[loc]}" if loc in lines else str(path)
    if error["type"] == "extra_forbidden":
        if loc[-1] in FOREIGN_KEYS:
            return f"{where}: unknown key '{dotted}' ({FOREIGN_KEYS[loc[-1]]})"
        hint = closest_key(root, loc)
        return f"{where}: unknown key '{dotted}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if error["type"] == "missing":
        return f"{where}: missing required key '{dotted}'"
    message = re.sub(r"^Value error, ", "", error["msg"])
    got = error.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {_short(repr(got))})"
    if not loc:
        return f"{where}: {message}"
    return f"{where}: {dotted}: {message}{shown}"


def error_lines(errors: list[dict], path: Path | str, lines: dict, root: type[BaseModel],
                tags: tuple[str, ...] = ()) -> str:
    """Every mistake at once, one line each, so that a config is fixed in one round; unknown keys
    first (a misspelled required key also shows up as "missing")."""
    ordered = sorted(explained_away(errors, root, tags), key=lambda e: e["type"] != "extra_forbidden")
    return "\n".join(dict.fromkeys(describe_error(e, path, lines, root, tags) for e in ordered))


def explained_away(errors: list[dict], root: type[BaseModel], tags: tuple[str, ...] = ()) -> list[dict]:
    """The errors less each missing key that an unknown key's suggestion already names (`dta:` is
    reported once, as "did you mean 'data'?", not again as "missing required key 'data'")."""
    def dotted(error: dict) -> str:
        return ".".join(str(p) for p in error["loc"] if p not in tags)

    hints = set()
    for error in errors:
        if error["type"] == "extra_forbidden":
            loc = tuple(dotted(error).split("."))
            hint = _ELSEWHERE.get(loc[-1], ("",))[0].split(" ")[0] or closest_key(root, loc)
            hints.add(hint or "")
    return [e for e in errors if not (e["type"] == "missing" and any(
        h == dotted(e) or h.startswith(dotted(e) + ".") for h in hints))]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    """Map each key path in the YAML text to its 1-based line, for error messages. Each node is
    visited once: an alias (`*name`) points at its anchor's node, and following aliases again and
    again costs exponential time in a few hundred bytes ("billion laughs")."""
    if not text:
        return {}
    try:
        root = yaml.compose(text)
    except (yaml.YAMLError, RecursionError, ValueError):
        return {}
    found: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()
    pending: list[tuple[Any, tuple[str, ...]]] = [(root, ())]
    while pending:
        node, prefix = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for here, line, child in _children(node, prefix):
            found.setdefault(here, line)
            pending.append((child, here))
    return found


def _children(node: Any, prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], int, Any]]:
    if isinstance(node, yaml.MappingNode):
        return [((*prefix, str(key.value)), key.start_mark.line + 1, value) for key, value in node.value]
    if isinstance(node, yaml.SequenceNode):
        return [((*prefix, str(index)), value.start_mark.line + 1, value)
                for index, value in enumerate(node.value)]
    return []


MAX_FLOW_DEPTH = 64  # PyYAML recurses per level (RecursionError near 500) and slows down long before
_FLOW_TOKENS = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:[^\'\n]|\'\')*\'|(?:^|(?<=\s))#[^\n]*|[\[\]{}\n]')


def check_nesting(text: str, path: Path | str) -> None:
    """Refuse `[[[[...` or `{{{{...` nested past MAX_FLOW_DEPTH before PyYAML spends seconds on it;
    brackets in quoted strings and comments do not count."""
    depth = line = 0
    for token in _FLOW_TOKENS.finditer(text):
        char = token.group()
        line += char == "\n"
        depth += (char in "[{") - (char in "]}")
        if depth > MAX_FLOW_DEPTH:
            raise UserError(f"{path}:{line + 1}: invalid YAML: nested too deeply (more than "
                            f"{MAX_FLOW_DEPTH} levels of [ or {{)")


MAX_CONFIG_VALUES = 100_000  # a real config has a few hundred; aliases can make billions


def check_expansion(raw: Any, path: Path | str) -> None:
    """Refuse a config whose aliases expand it past MAX_CONFIG_VALUES values, or that contains
    itself; counted without expanding (each shared list or mapping once)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    pending: list[tuple[Any, bool]] = [(raw, False)]
    while pending:
        node, closing = pending.pop()
        items = _items(node)
        if closing:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(item), 1) for item in items)
            if sizes[id(node)] > MAX_CONFIG_VALUES:
                raise UserError(f"{path}: YAML aliases (*name) expand the config to more than "
                                f"{MAX_CONFIG_VALUES} values; write the values out")
        elif id(node) in open_nodes:
            raise UserError(f"{path}: a YAML alias (*name) makes the config contain itself")
        elif id(node) not in sizes and items is not None:
            open_nodes.add(id(node))
            pending.append((node, True))
            pending += [(item, False) for item in items if _items(item) is not None]


def _items(node: Any) -> list | None:
    if isinstance(node, dict):
        return list(node.values())
    return node if isinstance(node, list) else None
