"""Fingerprints of configs and content digests of the files a run reads."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def fingerprint(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _content_hash() -> Any:
    """The one hash of file and text contents, so that `text_digest` and `file_digest` agree."""
    return hashlib.blake2b(digest_size=16)


def text_digest(text: str) -> str:
    """What `file_digest` gives a file holding `text` in UTF-8."""
    digest = _content_hash()
    digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def file_digest(path: Path, cache: dict[str, Any] | None = None) -> str:
    """Content hash of a file; `cache` (keyed by path, size, mtime) avoids re-reading big inputs."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    digest = _content_hash()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache is not None:
        cache[key] = value
    return value


class DigestCache:
    """A small JSON file of content digests shared by all runs under one output_dir."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, str] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.entries = {}

    @classmethod
    def of(cls, output_dir: str | Path) -> DigestCache:
        return cls(Path(output_dir) / ".digest-cache.json")

    def digest(self, path: Path) -> str:
        return file_digest(path, self.entries)

    def save(self) -> None:
        from pipeline.run_dir import atomic_write_json

        if not self.path.parent.is_dir():
            return  # planning alone (validate, --dry-run) must not create the output folder
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, self.entries)


def _model_files(folder: Path, weights: bool) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES) == weights)


def model_digest(name_or_path: str, cache: DigestCache, weights: bool) -> dict[str, str]:
    """A model folder's weight files (or its other files: config, tokenizer) by content; a hub id as is."""
    folder = Path(name_or_path)
    if not folder.exists():
        return {"hub_id": name_or_path}
    return {str(p.relative_to(folder)): cache.digest(p) for p in _model_files(folder, weights)}


def weight_bytes(name_or_path: str) -> int | None:
    """Total size of a model folder's weight files; None for a hub id (not measurable here)."""
    folder = Path(name_or_path)
    if not folder.exists():
        return None
    return sum(p.stat().st_size for p in _model_files(folder, weights=True))
