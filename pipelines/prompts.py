"""Prompt lists: the zoo's class prompts, a text file with one prompt per line, or a list -- checked the same way
for training (``data.prompts``) and for every command that samples (``--prompts``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from fastgen import zoo


def load_prompts(source: str | Sequence[str], setting: str = "--prompts") -> list[str]:
    """Prompts from ``"zoo"`` (the zoo's class prompts), a text file (one per line), or a list.

    Args:
        source: ``"zoo"``, a text file's path, or the prompts themselves.
        setting: the option or recipe key ``source`` came from, named in the errors (e.g. ``data.prompts``).
    """
    if not isinstance(source, str):
        prompts = [str(p) for p in source]
    elif source == "zoo":
        prompts = zoo.prompts()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{setting}: Prompt file {source!r} not found (give a text file with one prompt "
                                    "per line, or \"zoo\" for the zoo's class prompts).")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{setting}: Prompt file {source!r} is not UTF-8 text (give a text file with one "
                             "prompt per line).") from None
        if "\x00" in text:
            raise ValueError(f"{setting}: Prompt file {source!r} is binary, not text (give a text file with one "
                             "prompt per line).")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{setting}: No prompts in {source!r}.")
    return prompts


# The private model_index.json key (diffusers ignores keys that start with "_") under which a pipeline folder records
# the prompt arguments its call needs, e.g. {"max_sequence_length": 0}: fmnist-flow is an SD3 pipeline without T5
# trained with no T5 tokens, where SD3's default would append 256 all-zero ones (the card's call passes it).
PROMPT_OPTIONS_KEY = "_fastgen_prompt_options"


def prompt_options(pipe) -> dict:
    """The prompt arguments the pipeline's folder records for its call (``{}`` for most pipelines, for hub ids and
    for pipelines built in memory); fastgen passes them wherever it encodes prompts or calls the pipeline."""
    index = Path(str(getattr(pipe, "name_or_path", "") or "")) / "model_index.json"
    if not index.is_file():
        return {}
    return dict(json.loads(index.read_text()).get(PROMPT_OPTIONS_KEY) or {})


def write_prompt_options(folder: str | Path, options: dict) -> None:
    """Record ``options`` (see :func:`prompt_options`) in the model_index.json of a saved pipeline folder."""
    if not options:
        return
    index = Path(folder) / "model_index.json"
    entries = json.loads(index.read_text())
    entries[PROMPT_OPTIONS_KEY] = dict(options)
    index.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")


def call_text(options: dict) -> str:
    """``options`` as the call arguments a model card writes: ``", max_sequence_length=0"`` (``""`` for none)."""
    return "".join(f", {key}={value!r}" for key, value in options.items())


__all__ = ["load_prompts", "prompt_options", "write_prompt_options", "call_text", "PROMPT_OPTIONS_KEY"]
