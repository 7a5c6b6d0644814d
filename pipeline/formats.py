"""Row formats: what each data.format reads from a source row, and the normalised row the shard
stage stores (the tokenize stage only ever sees these columns, whatever the source field names).

| format | source fields (data.fields / text_field ...) | stored columns |
|---|---|---|
| text | text_field | text |
| classification | text_field, text_pair_field (optional), label_field | text, [text_pair], label |
| instruction | instruction, input (optional), output | prompt (rendered), completion |
| prompt_completion | prompt, completion | prompt, completion |
| chat | fields.messages: a list of {fields.role, fields.content}, roles renamed by role_map | messages |

Chat messages keep role and content, and OpenAI-style `tool_calls` (stored as JSON text),
`tool_call_id` and `name`, which the chat template receives as the source gave them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from pipeline.config import CHAT_ROLES, DataConfig, FieldNames

# The fixed alpaca prompt; the Input block is left out when the row has no input.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
# What the shard stores of a chat message: tool_calls as JSON text (their arguments vary by tool).
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.string()),
                     ("tool_call_id", pa.string()), ("name", pa.string())])

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
        "chat": [pa.field("messages", pa.list_(MESSAGE))],
    }[data.format]
    return pa.schema(fields + [pa.field("source", pa.string()), pa.field("line", pa.int64())])


class RowValidator:
    """Checks one row against data.format and returns the normalised row or a reason."""

    def __init__(self, data: DataConfig, num_labels: int | None, labels: list[str] | None = None):
        """labels: the names in id order, data.labels or those inferred from the training split."""
        self.data = data
        self.num_labels = len(labels) if labels else num_labels
        self.labels = labels
        self.ids = {name: index for index, name in enumerate(labels or [])}
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
        name = self.data.label_field
        if name not in row or row[name] is None or row[name] == "":
            return 0, f"missing field '{name}'"
        value = row[name]
        if isinstance(value, str) and value in self.ids:
            return self.ids[value], None
        index = _as_index(value)
        if index is not None and 0 <= index < (self.num_labels or 0):
            return index, None
        if self.data.labels:
            return 0, f"unknown label {value!r}: not in data.labels (expected one of {self.data.labels})"
        if self.labels:
            return 0, (f"unknown label {value!r}: not among the labels of data.train; data.labels can "
                       f"name them (expected one of {self.labels})")
        return 0, f"unknown label {value!r} (expected one of 0..{(self.num_labels or 1) - 1})"

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
            turn, problem = _message(message, f"{name}[{index}]", self.data.fields, self.data.role_map)
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


def _message(message: Any, where: str, names: FieldNames,
             role_map: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    if not isinstance(message, dict):
        kind = type(message).__name__
        return {}, f"{where} must be an object with {names.role} and {names.content}, got {kind}"
    given = message.get(names.role)
    role = role_map.get(given, given) if isinstance(given, str) else given
    if role not in CHAT_ROLES:
        return {}, f"{where}: unknown role {given!r}; map it to {', '.join(CHAT_ROLES)} with data.role_map"
    calls, problem = _tool_calls(message)
    content, missing = string_field(message, names.content)
    if missing and calls and message.get(names.content) in (None, ""):
        content, missing = None, None  # an assistant turn that only calls tools has no text
    if problem or missing:
        return {}, f"{where}: {problem or missing}"
    extra = {key: value if isinstance(value := message.get(key), str) else None
             for key in ("tool_call_id", "name")}
    return {"role": role, "content": content, "tool_calls": calls, **extra}, None


def _tool_calls(message: dict[str, Any]) -> tuple[str | None, str | None]:
    """OpenAI-style tool_calls as JSON text, or why they cannot be kept."""
    calls = message.get("tool_calls")
    if calls is None or calls == []:
        return None, None
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        return None, "field 'tool_calls' must be a list of objects"
    return json.dumps(calls, ensure_ascii=False, default=str), None


def _as_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return None
