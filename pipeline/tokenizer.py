"""Loading a tokenizer without the modeling code: tokenize workers start in a fraction of the time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import UserError


def load_tokenizer(name_or_path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {str(name_or_path)!r}: "
                        f"{str(err).splitlines()[0]}") from None
