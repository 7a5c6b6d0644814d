"""Tokenizers: transformers' AutoTokenizer, and for the tokenize stage the same Rust tokenizer saved
once and loaded without transformers.

Loading any tokenizer through transformers imports transformers and torch in every process that
does it, which costs more than tokenizing a typical shard (every SLURM array task of the tokenize
stage is such a process; docs/benchmarks.md has the numbers). Outside chat templates the stage calls
only the Rust backend that transformers builds for a fast tokenizer, so that backend is saved once per
tokenizer (its files' digests, the library versions and this file's code in the name) and loaded from
there with the `tokenizers` library alone. A copy is saved only if it encodes as transformers' own
call does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, inline_template
from pipeline.errors import UserError
from pipeline.run_dir import atomic_write_json, atomic_write_text

# Texts the saved and the live tokenizer must encode alike: spacing, accents, CJK, emoji, digits.
PROBES = ("Hello world", "  two  spaces\tand a tab\nnew line ", "naïve café, Straße", "東京タワー 🤗 ✓",
          "12345 3.14159 -7", "x", "")


def load_tokenizer(name_or_path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {str(name_or_path)!r}: "
                        f"{str(err).splitlines()[0]}") from None


def template_text(value: str) -> str:
    """The Jinja template data.chat_template gives, inline or in a file; its syntax checked, so a broken
    template is one config error before any row is rendered (transformers would reject every row)."""
    inline = inline_template(value)
    try:
        text = value if inline else Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.chat_template: cannot read {value!r}: {err}") from None
    from jinja2 import TemplateSyntaxError

    try:  # transformers' own environment (its tags, e.g. {% generation %}); it caches what it compiled
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # moved in another transformers: the first row rendered reports the error
        return text
    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as err:
        where = "inline template" if inline else value
        said = (err.message or "syntax error").splitlines()[0]
        raise UserError(f"data.chat_template: {where}, line {err.lineno}: {said}") from None
    return text


def chat_template(cfg: RunConfig, tokenizer) -> str | None:
    """data.chat_template's template; for format chat, the tokenizer must have one otherwise."""
    if cfg.data.format != "chat":
        return None
    if cfg.data.chat_template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"data.chat_template: the tokenizer of {cfg.model.name_or_path!r} has no chat "
                            "template; set data.chat_template to a Jinja template or a file holding one")
        return None
    return template_text(cfg.data.chat_template)


@dataclass
class RustTokenizer:
    """A fast tokenizer's Rust backend, called as a plain call of the transformers tokenizer calls it
    (no padding, truncation only when asked), and the settings of that tokenizer the stage reads."""

    backend: Any  # tokenizers.Tokenizer
    eos_token_id: int | None
    pad_token_id: int | None
    truncation_side: str
    split_special_tokens: bool  # not in the backend's JSON: set again after every load or copy

    def __post_init__(self) -> None:
        self.backend.encode_special_tokens = self.split_special_tokens

    def __deepcopy__(self, memo: dict) -> RustTokenizer:
        return RustTokenizer(copy.deepcopy(self.backend, memo), **self.settings())

    def settings(self) -> dict[str, Any]:
        return {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
                "truncation_side": self.truncation_side, "split_special_tokens": self.split_special_tokens}

    def ids(self, texts: list[Any], special: bool = True, max_len: int | None = None) -> list[list[int]]:
        """Token ids of texts (or (text, pair) tuples); `max_len` truncates as transformers'
        truncation=True does (longest first, on the tokenizer's truncation side)."""
        if self.backend.padding is not None:  # a tokenizer.json may pad; a plain call never does
            self.backend.no_padding()
        if max_len is not None:
            self.backend.enable_truncation(max_len, strategy="longest_first", direction=self.truncation_side)
        elif self.backend.truncation is not None:
            self.backend.no_truncation()
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=special)]


def rust_tokenizer(tokenizer: Any) -> RustTokenizer | None:
    """A RustTokenizer as it is; else the Rust side of a transformers tokenizer (shared with it, not
    a copy), where it encodes as the tokenizer's own call does; None for a slow tokenizer or one
    whose call does more."""
    if isinstance(tokenizer, RustTokenizer):
        return tokenizer
    rust = _rust_side(tokenizer)
    return rust if rust is not None and _encodes_alike(rust, tokenizer) else None


def _rust_side(hf_tokenizer: Any) -> RustTokenizer | None:
    backend = getattr(hf_tokenizer, "_tokenizer", None)
    if not hasattr(backend, "encode_batch_fast"):
        return None
    return RustTokenizer(backend, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id,
                         hf_tokenizer.truncation_side,
                         bool(getattr(hf_tokenizer, "split_special_tokens", False)))


def saved_tokenizer(name_or_path: str, folder: Path, name: str) -> RustTokenizer | Any:
    """The tokenizer of `name_or_path` as saved in `folder` under `name`, saved first if it is not
    there yet (the one load through transformers). A slow tokenizer, one that cannot be saved, or one
    whose saved copy does not encode as transformers' call does, comes from transformers every time
    (and the Encoder then calls it, not its backend)."""
    from tokenizers import Tokenizer

    settings = _read_settings(folder / f"{name}.json")
    if settings is not None and not settings.get("rust"):
        return load_tokenizer(name_or_path)
    path = folder / f"{name}.tokenizer.json"
    loaded = _built(lambda: Tokenizer.from_file(str(path)), settings) if settings else None
    return loaded if loaded is not None else _save(load_tokenizer(name_or_path), folder, name)


def _read_settings(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # not saved yet: save it


def _built(backend: Callable[[], Any], settings: dict[str, Any]) -> RustTokenizer | None:
    """A RustTokenizer from `backend()` and `settings`; None where tokenizers cannot build it (a
    saved file removed or edited by hand, a custom Python pre-tokenizer with no JSON form, as
    RoFormer's) or the settings lack a key: it is then saved again, or comes from transformers."""
    fields = [k for k in RustTokenizer.__dataclass_fields__ if k != "backend"]
    try:
        return RustTokenizer(backend(), **{k: settings[k] for k in fields})
    except Exception:  # tokenizers raises a bare Exception
        return None


def _save(hf_tokenizer: Any, folder: Path, name: str) -> RustTokenizer | Any:
    """Write the backend, then the settings (last: they mark the save complete). The copy checked is
    the one through the backend's JSON, as a later load will see it."""
    from tokenizers import Tokenizer

    live = _rust_side(hf_tokenizer)
    saved = (_built(lambda: Tokenizer.from_str(live.backend.to_str()), live.settings())
             if live is not None else None)
    if saved is not None and _encodes_alike(saved, hf_tokenizer):
        atomic_write_text(folder / f"{name}.tokenizer.json", saved.backend.to_str())
        atomic_write_json(folder / f"{name}.json", {"rust": True, **saved.settings()})
        return saved
    atomic_write_json(folder / f"{name}.json", {"rust": False})
    return hf_tokenizer


def _encodes_alike(rust: RustTokenizer, hf_tokenizer: Any) -> bool:
    """The Rust tokenizer against transformers' own call, with and without special tokens, with pairs."""
    specials = " ".join(getattr(hf_tokenizer, "all_special_tokens", []))
    texts = [*PROBES, f"{specials} between {specials}"]
    pairs = list(reversed(texts))
    return all(_ids_alike(rust, hf_tokenizer, texts, batch, batch_pairs, special)
               for batch, batch_pairs in ((texts, None), (list(zip(texts, pairs)), pairs))
               for special in (True, False))


def _ids_alike(rust: RustTokenizer, hf_tokenizer: Any, texts: list[str], batch: list[Any],
               batch_pairs: list[str] | None, special: bool) -> bool:
    """One probe of _encodes_alike: `batch` (texts, or (text, pair) tuples) through the Rust
    tokenizer against `texts` and `batch_pairs` through transformers' own call."""
    return _ids_or_error(lambda: rust.ids(batch, special)) == _ids_or_error(
        lambda: hf_tokenizer(texts, batch_pairs, add_special_tokens=special)["input_ids"])


def _ids_or_error(encode: Callable[[], list]) -> list | str:
    try:
        return encode()
    except Exception:  # e.g. a post-processor without a pair template fails on pairs: both must fail
        return "error"
