"""Row formats: what each data.format reads from a source row, and the normalised row the shard
stage stores (the tokenize stage only ever sees these columns, whatever the source field names).

| format | source fields (data.fields / text_field ...) | stored columns |
|---|---|---|
| text | text_field | text |
| classification | text_field, text_pair_field (optional), label_field | text, [text_pair], label |
| instruction | instruction, input (optional), output | prompt (rendered), completion |
| prompt_completion | prompt, completion | prompt, completion |
| chat | messages: a list of {role, content} | messages (role and content only) |
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from pipeline.config import DataConfig

# The fixed alpaca prompt; the Input block is left out when the row has no input.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CHAT_ROLES = ("system", "user", "assistant", "tool")

Checked = tuple[dict[str, Any] | None, str | None]


def render_instruction(instruction: str, input_text: str = "") -> str:
    """The prompt an instruction row is trained on (and should be prompted with at inference)."""
    if input_text.strip():
        return INSTRUCTION_TEMPLATE.format(instruction=instruction, input=input_text)
    return INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction=instruction)


def has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def string_field(row: dict[str, Any], name: str, required: bool = True) -> tuple[str, str | None]:
    """The string in row[name], or a reason; an optional field may be missing, null or empty."""
    value = row.get(name)
    if value is None or (not required and value == ""):
        return "", f"missing field '{name}'" if required else None
    if not isinstance(value, str):
        return "", f"field '{name}' must be a string, got {type(value).__name__}"
    if required and not value.strip():
        return "", f"empty text in field '{name}'"
    if has_surrogates(value):
        return "", f"invalid Unicode (lone surrogate) in field '{name}'"
    return value, None


def shard_schema(data: DataConfig) -> pa.Schema:
    fields = {
        "text": [pa.field("text", pa.string())],
        "classification": [pa.field("text", pa.string())]
        + ([pa.field("text_pair", pa.string())] if data.text_pair_field else [])
        + [pa.field("label", pa.int64())],
        "instruction": [pa.field("prompt", pa.string()), pa.field("completion", pa.string())],
        "prompt_completion": [pa.field("prompt", pa.string()), pa.field("completion", pa.string())],
        "chat": [pa.field("messages",
                          pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))],
    }[data.format]
    return pa.schema(fields + [pa.field("source", pa.string()), pa.field("line", pa.int64())])


class RowValidator:
    """Checks one row against data.format and returns the normalised row or a reason."""

    def __init__(self, data: DataConfig, num_labels: int | None):
        self.data = data
        self.num_labels = num_labels
        self.check = getattr(self, f"_{data.format}")

    def __call__(self, row: dict[str, Any]) -> Checked:
        return self.check(row)

    def _text(self, row: dict[str, Any]) -> Checked:
        text, problem = string_field(row, self.data.text_field)
        return (None, problem) if problem else ({"text": text}, None)

    def _classification(self, row: dict[str, Any]) -> Checked:
        out, problem = self._text(row)
        if problem:
            return None, problem
        if self.data.text_pair_field:
            out["text_pair"], problem = string_field(row, self.data.text_pair_field)
            if problem:
                return None, problem
        label, problem = self._label(row)
        return (None, problem) if problem else ({**out, "label": label}, None)

    def _label(self, row: dict[str, Any]) -> tuple[int, str | None]:
        name, names = self.data.label_field, self.data.labels
        if name not in row or row[name] is None or row[name] == "":
            return 0, f"missing field '{name}'"
        value = row[name]
        if names and isinstance(value, str) and value in names:
            return names.index(value), None
        index = _as_index(value)
        if index is not None and 0 <= index < (self.num_labels or 0):
            return index, None
        expected = names if names else f"0..{(self.num_labels or 1) - 1}"
        return 0, f"unknown label {value!r} (expected one of {expected})"

    def _instruction(self, row: dict[str, Any]) -> Checked:
        names = self.data.fields
        values, problem = _strings(row, [(names.instruction, True), (names.input, False),
                                         (names.output, True)])
        if problem:
            return None, problem
        instruction, extra, output = values
        return {"prompt": render_instruction(instruction, extra), "completion": output}, None

    def _prompt_completion(self, row: dict[str, Any]) -> Checked:
        names = self.data.fields
        values, problem = _strings(row, [(names.prompt, True), (names.completion, True)])
        return (None, problem) if problem else ({"prompt": values[0], "completion": values[1]}, None)

    def _chat(self, row: dict[str, Any]) -> Checked:
        name = self.data.fields.messages
        value = row.get(name)
        if value is None:
            return None, f"missing field '{name}'"
        if not isinstance(value, list):
            return None, f"field '{name}' must be a list of messages, got {type(value).__name__}"
        turns = []
        for index, message in enumerate(value):
            turn, problem = _message(message, f"{name}[{index}]")
            if problem:
                return None, problem
            turns.append(turn)
        if not any(t["role"] == "assistant" for t in turns):
            return None, f"no assistant turn in field '{name}'"
        return {"messages": turns}, None


def _strings(row: dict[str, Any], wanted: list[tuple[str, bool]]) -> tuple[list[str], str | None]:
    """Several string fields (name, required); the first problem found."""
    values = []
    for name, required in wanted:
        value, problem = string_field(row, name, required)
        if problem:
            return [], problem
        values.append(value)
    return values, None


def _message(message: Any, where: str) -> tuple[dict[str, str], str | None]:
    if not isinstance(message, dict):
        return {}, f"{where} must be an object with role and content, got {type(message).__name__}"
    role = message.get("role")
    if role not in CHAT_ROLES:
        return {}, f"{where}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})"
    content, problem = string_field(message, "content")
    return ({}, f"{where}: {problem}") if problem else ({"role": role, "content": content}, None)


def _as_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return None
