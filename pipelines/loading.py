"""Load a pipeline by zoo name, folder or hub id, with one clear error for each way it can fail."""

from __future__ import annotations

from pathlib import Path

from fastgen import zoo


def load_pipeline(name_or_path: str, device: str | None = None, what: str = "Pipeline", allow_pickle: bool = False,
                  **components):
    """``DiffusionPipeline.from_pretrained`` on a zoo name, a pipeline folder or a hub id.

    Weights are read only from safetensors files (``use_safetensors=True``): a ``.bin`` / ``.ckpt`` weight
    file is a pickle, which can run code when it is loaded, so loading one is the user's explicit choice.

    Args:
        name_or_path: a zoo teacher name (``fmnist-ldm``), a diffusers pipeline folder, or ``owner/name``.
        device: optional device to move the pipeline to.
        what: the word used in error messages (``"Teacher"``, ``"Pipeline"``).
        allow_pickle: also load pickled weight files where a component has no safetensors (only for
            folders from a source you trust; diffusers then loads them with ``torch.load``).
        components: components passed to ``from_pretrained`` in place of the folder's, e.g.
            ``text_encoder_3=None, tokenizer_3=None`` (SD3 without T5).
    Raises:
        FileNotFoundError: a folder without ``model_index.json``, something that is neither a zoo name,
            a folder nor a hub id, a component without safetensors weights (unless ``allow_pickle``), or a
            pipeline diffusers cannot load (offline hub ids included).
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    target = zoo.resolve(name_or_path)
    path = Path(target)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{what} {name_or_path!r} is not a diffusers pipeline folder (no model_index.json).")
    if not path.exists() and (target.count("/") != 1 or target.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{what} {name_or_path!r} is neither a zoo teacher ({', '.join(zoo.names())}), "
                                "a diffusers pipeline folder, nor a hub id (owner/name).")
    diffusers_logging.disable_progress_bar()  # loading bars would bury the commands' one-line errors
    transformers_logging.disable_progress_bar()
    components = {**absent_components(path), **components}
    try:
        pipe = DiffusionPipeline.from_pretrained(target, use_safetensors=None if allow_pickle else True, **components)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = ""
        if not allow_pickle and ".safetensors" in str(err):
            hint = (" (fastgen loads only safetensors weights: pickled .bin files can run code when loaded; "
                    "convert them, or pass --allow-pickle for a folder from a source you trust)")
        raise FileNotFoundError(f"Could not load {what.lower()} {name_or_path!r} as a diffusers pipeline: "
                                f"{first}{hint}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


def absent_components(folder: Path) -> dict:
    """``{name: None}`` for each component a local pipeline folder was saved without (``[null, null]`` in its
    ``model_index.json``, e.g. SD3's ``text_encoder_3`` and ``tokenizer_3`` without T5): diffusers reloads such a
    folder only when they are passed as ``None`` again, unless the class lists them as optional."""
    import json

    index = folder / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {name: None for name, value in entries.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is None}


def pipeline_fingerprint(pipe) -> dict[str, str]:
    """A digest of each component of a loaded pipeline: the weights of its networks (names, shapes, dtypes and
    bytes), the config of its scheduler, the vocabulary of its tokenizers. Loads of the same weights agree,
    wherever the folder lies; a changed weight changes its component's digest. One pass over the weights
    (about a second per GB)."""
    import hashlib
    import json

    import torch

    digests = {}
    for name, component in pipe.components.items():
        h = hashlib.sha256()
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                h.update(f"{key} {tuple(tensor.shape)} {tensor.dtype}".encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif hasattr(component, "get_vocab"):
            h.update(json.dumps(component.get_vocab(), sort_keys=True).encode())
        elif getattr(component, "config", None) is not None:
            config = {k: v for k, v in dict(component.config).items() if not k.startswith("_")}
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
        else:
            continue
        digests[name] = h.hexdigest()[:16]
    return digests
