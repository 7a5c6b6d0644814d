"""What changed in a stage's inputs since its output was written, said in config keys.

A stage's manifest (and the claim a partial stage leaves) records what its fingerprint covered; comparing
that with what it covers now names the keys (`train.lr: 5e-05 -> 0.0001`), which is what a user needs to
decide between forcing the stage and starting a new run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SHOWN = 3  # changes named in one line; the rest are counted
VALUE_CHARS = 40
VERSION_KEY = "(output version)"


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.key}: {_short(self.before)} -> {_short(self.after)}"


def flatten(covered: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists and scalars are leaves."""
    if not isinstance(covered, dict):
        return {prefix: covered}
    flat: dict[str, Any] = {}
    for key, value in covered.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[Change]:
    """Every leaf key whose value differs (added and removed keys too), in key order."""
    old, new = flatten(before), flatten(after)
    return [Change(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def stage_changes(record: dict[str, Any], covered: dict[str, Any], version: int) -> list[Change]:
    """What differs between a manifest or claim `record` and the stage's inputs now."""
    found = changes(record.get("covers", {}), covered)
    if record.get("version") != version:
        found.insert(0, Change(VERSION_KEY, record.get("version"), version))
    return found


def is_extension(found: list[Change], extendable: tuple[str, ...]) -> bool:
    """Only keys that lengthen the stage changed, each upwards (e.g. train.max_steps 500 -> 800)."""
    return bool(found) and all(
        c.key in extendable and isinstance(c.before, (int, float)) and isinstance(c.after, (int, float))
        and c.after > c.before for c in found)


def describe(found: list[Change]) -> str:
    if not found:
        return "its upstream stages changed"
    if found[0].key == VERSION_KEY and found[0].before is None:
        return "it was written by an older ftpipe that did not record its inputs"
    named = "; ".join(str(c) for c in found[:SHOWN])
    return named + (f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else "")


def _short(value: Any) -> str:
    text = "(unset)" if value is None else str(value)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 3] + "..."
