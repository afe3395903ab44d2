"""Pipeline folders that transformers 4.x reads too, not only the transformers 5 that wrote them.

A hub-ready folder is loaded by whatever diffusers / transformers its users have. transformers 5 writes two
components in a layout transformers 4.x cannot read correctly (measured with transformers 5.24 writing and
4.45.2 reading):

* ``CLIPTokenizer`` is saved as ``tokenizer.json`` only; transformers 4.x loads the class named in
  ``model_index.json`` (the slow ``CLIPTokenizer``), which needs ``vocab.json`` and ``merges.txt``. They are
  written from the tokenizer's own BPE model (``tokenizers``' ``BPE.save``), so they hold the same vocabulary.
* ``CLIPTextModel`` lost its ``text_model`` wrapper module in transformers 5. A text encoder loaded from a
  checkpoint with the ``text_model.`` key prefix (every CLIP checkpoint of the hub) is saved with the prefix
  again, but one built from a config (the zoo's) is saved without it -- and transformers 4.x then loads it with
  every weight newly initialised, with only a log message. The keys are renamed to the prefixed layout, which
  transformers 5 reads as well (its ``PrefixChange`` conversion for ``CLIPTextModel``).
"""

from __future__ import annotations

import json
from pathlib import Path

# Text encoders whose transformers-4 checkpoints prefix every key (transformers 5 reads both layouts).
LEGACY_KEY_PREFIX = {"CLIPTextModel": "text_model."}
BPE_FILES = ("vocab.json", "merges.txt")


def write_bpe_files(tokenizer, folder: Path) -> list[Path]:
    """Write ``vocab.json`` and ``merges.txt`` of a BPE tokenizer (CLIP, GPT-2) into ``folder`` when missing.

    Returns the files written ([] when they were there, or the tokenizer is not a byte-level BPE one, e.g. a
    sentencepiece T5 tokenizer, which transformers 5 still saves with its ``spiece.model``).
    """
    names = getattr(tokenizer, "vocab_files_names", {})
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if names.get("vocab_file") != "vocab.json" or names.get("merges_file") != "merges.txt" or backend is None:
        return []
    if type(backend.model).__name__ != "BPE" or all((folder / name).is_file() for name in BPE_FILES):
        return []
    return [Path(p) for p in backend.model.save(str(folder))]


def write_legacy_text_encoder(model, folder: Path) -> bool:
    """Rename the safetensors keys of a saved text encoder to its transformers-4 layout (see the module docstring).

    Returns whether any file was rewritten (``False`` for other classes and for folders already in that layout).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix = LEGACY_KEY_PREFIX.get(type(model).__name__)
    if prefix is None:
        return False
    changed = False
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            if all(k.startswith(prefix) for k in keys):
                continue
            tensors = {(k if k.startswith(prefix) else prefix + k): f.get_tensor(k) for k in keys}
        save_file(tensors, str(file), metadata={"format": "pt", **metadata})
        changed = True
    index = folder / "model.safetensors.index.json"
    if changed and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {(k if k.startswith(prefix) else prefix + k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return changed


def make_portable(pipe, folder: str | Path) -> None:
    """Apply :func:`write_bpe_files` and :func:`write_legacy_text_encoder` to every component of ``pipe`` saved in
    ``folder`` (by ``pipe.save_pretrained(folder)``)."""
    folder = Path(folder)
    for name, component in pipe.components.items():
        sub = folder / name
        if component is None or not sub.is_dir():
            continue
        write_bpe_files(component, sub)
        write_legacy_text_encoder(component, sub)


__all__ = ["make_portable", "write_bpe_files", "write_legacy_text_encoder"]
