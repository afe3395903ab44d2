"""Load a pipeline by zoo name, folder or hub id, with one clear error for each way it can fail."""

from __future__ import annotations

from pathlib import Path

from fastgen import zoo


def load_pipeline(name_or_path: str, device: str | None = None, what: str = "Pipeline"):
    """``DiffusionPipeline.from_pretrained`` on a zoo name, a pipeline folder or a hub id.

    Args:
        name_or_path: a zoo teacher name (``fmnist-ldm``), a diffusers pipeline folder, or ``owner/name``.
        device: optional device to move the pipeline to.
        what: the word used in error messages (``"Teacher"``, ``"Pipeline"``).
    Raises:
        FileNotFoundError: a folder without ``model_index.json``, something that is neither a zoo name,
            a folder nor a hub id, or a pipeline diffusers cannot load (offline hub ids included).
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
    try:
        pipe = DiffusionPipeline.from_pretrained(target)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"Could not load {what.lower()} {name_or_path!r} as a diffusers pipeline: "
                                f"{str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe
