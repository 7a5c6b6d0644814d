"""evaluate.prompts: the prompts file samples.jsonl continues instead of held-out prompts.

A .txt file holds one prompt a line (blank lines skipped); a .jsonl file one JSON object a line,
{"prompt": TEXT} or, for data.format chat, {"messages": [...]}, each with an optional "reference".
Chat runs render every prompt (a text as one user turn) with the chat template training used and
its generation prompt, so the model continues as the assistant. Import-light: `validate` reads the
file to report a bad line before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

KEY = "evaluate.prompts"


@dataclass(frozen=True)
class PromptEntry:
    prompt: str | list[dict[str, Any]]  # a text, or chat messages
    reference: str = ""


@dataclass(frozen=True)
class Prompt:
    """A prompt as generation takes it: what samples.jsonl shows, the ids continued, the reference."""

    text: str
    ids: list[int]
    reference: str = ""


def read_prompts(path: str | Path, chat: bool) -> list[PromptEntry]:
    """The file's prompts; UserError naming the file and line of the first bad one."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{KEY}: cannot read {str(path)!r}: {err}") from None
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    entries = [_entry(line, f"{path}:{number}", jsonl, chat)
               for number, line in enumerate(lines, 1) if line.strip()]
    if not entries:
        raise UserError(f"{KEY}: {path} holds no prompts")
    return entries


def _entry(line: str, where: str, jsonl: bool, chat: bool) -> PromptEntry:
    if not jsonl:
        return PromptEntry(line)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{KEY}: {where}: not JSON ({err.msg})") from None
    if isinstance(record, str):
        return PromptEntry(record)
    if not isinstance(record, dict) or not isinstance(record.get("reference", ""), str):
        raise UserError(f"{KEY}: {where}: expected {{\"prompt\": TEXT}} or {{\"messages\": [...]}}"
                        " with an optional \"reference\" text")
    reference = record.get("reference", "")
    if isinstance(record.get("prompt"), str):
        return PromptEntry(record["prompt"], reference)
    messages = record.get("messages")
    if not chat and messages is not None:
        raise UserError(f"{KEY}: {where}: \"messages\" needs data.format chat; give a \"prompt\" text")
    if not _are_messages(messages):
        raise UserError(f"{KEY}: {where}: no \"prompt\" text and no \"messages\" list of "
                        "{\"role\": ..., \"content\": ...} objects")
    return PromptEntry(messages, reference)


def _are_messages(messages: Any) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages))


def encoded(entries: list[PromptEntry], tokenizer: Any, chat: bool) -> list[Prompt]:
    """Token ids of each prompt: chat runs render it with the tokenizer's chat template (the one training
    used, saved with the consolidated model) and the generation prompt."""
    prompts = []
    for entry in entries:
        if chat:
            messages = entry.prompt if isinstance(entry.prompt, list) else [{"role": "user",
                                                                               "content": entry.prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has its own
        else:
            text = entry.prompt
            ids = tokenizer(text)["input_ids"]
        prompts.append(Prompt(text, list(ids), entry.reference))
    return prompts
