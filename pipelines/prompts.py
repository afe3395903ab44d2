"""Prompt lists: the zoo's class prompts, a text file with one prompt per line, or a list -- checked the same way
for training (``data.prompts``) and for every command that samples (``--prompts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fastgen import zoo


def load_prompts(source: str | Sequence[str]) -> list[str]:
    """Prompts from ``"zoo"`` (the zoo's class prompts), a text file (one per line), or a list."""
    if not isinstance(source, str):
        prompts = [str(p) for p in source]
    elif source == "zoo":
        prompts = zoo.prompts()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {source!r} not found (give a text file with one prompt per line, "
                                    "or \"zoo\" for the zoo's class prompts).")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"Prompt file {source!r} is not UTF-8 text (give a text file with one prompt per "
                             "line).") from None
        if "\x00" in text:
            raise ValueError(f"Prompt file {source!r} is binary, not text (give a text file with one prompt per line).")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"No prompts in {source!r}.")
    return prompts


__all__ = ["load_prompts"]
