"""Load a pipeline by zoo name, folder or hub id, with one clear error for each way it can fail."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastgen import zoo
from fastgen.methods.base import option

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ATTENTION = ("sdpa", "xformers")


@dataclass
class LoadOptions:
    """How a pipeline is loaded. Recipe: ``[loading]``; commands: ``--dtype``, ``--variant``, ``--revision``,
    ``--component NAME=none|FOLDER|FILE``, ``--single-file-config``, ``--attention``.

    Args:
        dtype: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``: ``torch_dtype`` of every network.
        variant: weight-file variant (``"fp16"`` reads ``*.fp16.safetensors``); ``""``: the default files.
        revision: hub revision (branch, tag or commit); ``""``: the default branch.
        components: replaced components: ``{"text_encoder_3": "none"}`` drops one (SD3 without T5), a folder
            loads that component from it (with the class the pipeline's ``model_index.json`` names), a
            ``.safetensors`` file converts it from a single file in its original layout (a Flux transformer file:
            that class's ``from_single_file`` with the configs of the pipeline's subfolder of that name).
        single_file_config: for a single-file checkpoint (``.safetensors`` / ``.ckpt`` as the teacher), the
            diffusers pipeline folder or hub id whose configs it is converted with (``from_single_file(config=)``;
            offline, a local folder).
        attention: ``"sdpa"`` (PyTorch's scaled-dot-product attention, diffusers' default) or ``"xformers"``
            (memory-efficient attention where CUDA and the xformers package are there; SDPA with a note elsewhere).
    """

    dtype: str = option("fp32", "torch dtype of the teacher's networks: fp32, fp16 or bf16")
    variant: str = option("", "weight-file variant, e.g. 'fp16' (*.fp16.safetensors); '': the default files")
    revision: str = option("", "hub revision (branch, tag or commit); '': the default branch")
    components: dict = option({}, "replaced components, e.g. {text_encoder_3 = \"none\"} (drop T5), "
                                  "{vae = \"path/to/vae\"} or {transformer = \"flux1-dev.safetensors\"}")
    single_file_config: str = option("", "a single-file checkpoint teacher (.safetensors): the diffusers pipeline "
                                         "folder whose configs convert it (from_single_file(config=))")
    attention: str = option("sdpa", "'sdpa' (PyTorch scaled-dot-product attention) or 'xformers' (CUDA + xformers; "
                                    "else SDPA, with a note)")

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}.")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {self.attention!r}.")
        bad = [k for k, v in self.components.items() if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"components: {', '.join(bad)} must be 'none' (drop it), a component folder or a "
                             ".safetensors single file.")

    def torch_dtype(self):
        import torch

        return getattr(torch, DTYPES[self.dtype])


def _component_overrides(target: str, components: dict, dtype) -> dict:
    """``from_pretrained`` / ``from_single_file`` keyword arguments for replaced components: ``None`` for
    ``"none"``, else the component with the class the pipeline's ``model_index.json`` names for it, loaded from its
    folder or converted from a ``.safetensors`` single file (:func:`_single_file_component`)."""
    import importlib
    import json

    out = {}
    index = Path(target) / "model_index.json"
    names = json.loads(index.read_text()) if index.is_file() else {}
    for name, value in components.items():
        if value.lower() == "none":
            out[name] = None
            continue
        single_file = Path(value).is_file() and Path(value).suffix == ".safetensors"
        if not Path(value).is_dir() and not single_file:
            raise FileNotFoundError(f"--component {name}={value}: neither a folder nor a .safetensors file (give a "
                                    "component folder, a .safetensors single file of it, or 'none').")
        library, cls = (names.get(name) or [None, None])[:2]
        if cls is None:
            raise ValueError(f"--component {name}: the pipeline has no component {name!r} (its components: "
                             f"{', '.join(k for k, v in names.items() if isinstance(v, list)) or 'unknown'}).")
        cls = getattr(importlib.import_module(library), cls)
        out[name] = (_single_file_component(cls, name, value, target, dtype) if single_file
                     else cls.from_pretrained(value, dtype=dtype))
    return out


def _conversion_errors() -> tuple:
    """What diffusers' single-file conversion raises for a file it cannot convert (a missing key, a shape that
    does not fit the config, a component the file does not hold)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    return OSError, ValueError, KeyError, IndexError, RuntimeError, SingleFileComponentError


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (its class name when it has none): for one-line errors."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _single_file_component(cls, name: str, file: str, config: str, dtype):
    """Component ``name`` (a diffusers model class) converted from a single file in its original layout by
    ``cls.from_single_file(file, config=config, subfolder=name)``: the configs of ``config``'s subfolder ``name``,
    the weights of the file (e.g. a Flux transformer file such as flux1-dev.safetensors into a Flux folder)."""
    from diffusers import FromOriginalModelMixin

    if not issubclass(cls, FromOriginalModelMixin):
        raise ValueError(f"--component {name}={file}: diffusers converts single files only for its own models (UNet, "
                         f"VAE, transformers), not {cls.__name__}; give a component folder.")
    try:
        return cls.from_single_file(file, config=str(config), subfolder=name, dtype=dtype)
    except _conversion_errors() as err:
        raise FileNotFoundError(f"Could not convert --component {name}={file} with the configs of "
                                f"{str(Path(config) / name)!r}: {first_line(err)}") from None


def set_attention(pipe, attention: str) -> None:
    """``"xformers"``: diffusers' memory-efficient attention where it is available (CUDA and the xformers package);
    elsewhere PyTorch's scaled-dot-product attention stays, with a one-line note saying why. ``"sdpa"``: PyTorch's
    scaled-dot-product attention, which diffusers uses by default."""
    import sys

    import torch

    if attention == "sdpa":
        return
    if not torch.cuda.is_available():
        missing = "a CUDA device (this machine has none)"
    else:
        try:
            import xformers  # noqa: F401
        except ImportError:
            missing = "the xformers package (pip install xformers)"
        else:
            pipe.enable_xformers_memory_efficient_attention()
            return
    print(f"note: attention 'xformers' needs {missing}; using PyTorch's scaled-dot-product attention (attention "
          "'sdpa') instead.", file=sys.stderr)


def load_pipeline(name_or_path: str, device: str | None = None, what: str = "Pipeline", allow_pickle: bool = False,
                  options: LoadOptions | None = None, **components):
    """``DiffusionPipeline.from_pretrained`` on a zoo name, a pipeline folder or a hub id.

    Weights are read only from safetensors files (``use_safetensors=True``): a ``.bin`` / ``.ckpt`` weight
    file is a pickle, which can run code when it is loaded, so loading one is the user's explicit choice.

    Args:
        name_or_path: a zoo teacher name (``fmnist-ldm``), a diffusers pipeline folder, or ``owner/name``.
        device: optional device to move the pipeline to.
        what: the word used in error messages (``"Teacher"``, ``"Pipeline"``).
        allow_pickle: also load pickled weight files where a component has no safetensors (only for
            folders from a source you trust; diffusers then loads them with ``torch.load``).
        options: dtype, variant, revision, replaced components, single-file config, attention
            (:class:`LoadOptions`; default: fp32, the default files).
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

    options = options or LoadOptions()
    options.validate()
    target = zoo.resolve(name_or_path)
    path = Path(target)
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        pipe = _load_single_file(path, what, allow_pickle, options)
        set_attention(pipe, options.attention)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device) if device else pipe
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{what} {name_or_path!r} is not a diffusers pipeline folder (no model_index.json).")
    if not path.exists() and (target.count("/") != 1 or target.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{what} {name_or_path!r} is neither a zoo teacher ({', '.join(zoo.names())}), "
                                "a diffusers pipeline folder, nor a hub id (owner/name).")
    diffusers_logging.disable_progress_bar()  # loading bars would bury the commands' one-line errors
    transformers_logging.disable_progress_bar()
    dtype = options.torch_dtype()
    kwargs = {"dtype": dtype, "variant": options.variant or None, "revision": options.revision or None}
    kwargs.update({**absent_components(path), **_component_overrides(target, options.components, dtype),
                   **components})
    try:
        pipe = DiffusionPipeline.from_pretrained(target, use_safetensors=None if allow_pickle else True, **kwargs)
    except (OSError, ValueError) as err:
        first = first_line(err)
        hint = ""
        if not allow_pickle and ".safetensors" in str(err):
            hint = (" (fastgen loads only safetensors weights: pickled .bin files can run code when loaded; "
                    "convert them, or pass --allow-pickle for a folder from a source you trust)")
        raise FileNotFoundError(f"Could not load {what.lower()} {name_or_path!r} as a diffusers pipeline: "
                                f"{first}{hint}") from None
    set_attention(pipe, options.attention)
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


def _load_single_file(path: Path, what: str, allow_pickle: bool, options: LoadOptions):
    """A pipeline from a single-file checkpoint in the original (non-diffusers) layout, converted by diffusers'
    ``from_single_file`` with the configs of ``options.single_file_config`` (a pipeline folder: its
    ``model_index.json`` names the pipeline class)."""
    import diffusers

    if path.suffix != ".safetensors" and not allow_pickle:
        raise FileNotFoundError(f"{what} {str(path)!r} is a pickled checkpoint ({path.suffix}), which can run code when "
                                "loaded; convert it to .safetensors, or pass --allow-pickle for a file you trust.")
    config = options.single_file_config
    if not config:
        raise ValueError(f"{what} {str(path)!r} is a single-file checkpoint: give the diffusers pipeline folder (or hub "
                         "id) of its architecture with --single-file-config (recipe: loading.single_file_config).")
    index = Path(config) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--single-file-config {config!r} is not a diffusers pipeline folder (no "
                                "model_index.json); fastgen converts single files offline, from a local folder.")
    import json

    from diffusers.loaders.single_file_utils import SingleFileComponentError

    cls = getattr(diffusers, json.loads(index.read_text())["_class_name"])
    overrides = _component_overrides(config, options.components, options.torch_dtype())
    try:
        return cls.from_single_file(str(path), config=str(config), torch_dtype=options.torch_dtype(), **overrides)
    except _conversion_errors() as err:
        hint = ""
        if isinstance(err, SingleFileComponentError):
            hint = (" (the file lacks that network and diffusers does not take it from the config folder: give it "
                    "with --component NAME=FOLDER, e.g. the config folder's subfolder, or give the folder as the "
                    "teacher and this file as --component NAME=FILE for each network it holds)")
        raise FileNotFoundError(f"Could not convert {what.lower()} {str(path)!r} with the configs of {config!r}: "
                                f"{first_line(err)}{hint}") from None


def module_digest(module) -> str:
    """A digest of a network's weights (names, shapes, dtypes and bytes): equal for loads of the same weights,
    wherever they lie; a changed weight changes it. One pass over the weights (about a second per GB)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(f"{key} {tuple(tensor.shape)} {tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def pipeline_fingerprint(pipe) -> dict[str, str]:
    """A digest of each component of a loaded pipeline: the weights of its networks (:func:`module_digest`), the
    config of its scheduler, the vocabulary of its tokenizers. Loads of the same weights agree, wherever the folder
    lies; a changed weight changes its component's digest."""
    import hashlib
    import json

    import torch

    digests = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            digests[name] = module_digest(component)
            continue
        h = hashlib.sha256()
        if hasattr(component, "get_vocab"):
            h.update(json.dumps(component.get_vocab(), sort_keys=True).encode())
        elif getattr(component, "config", None) is not None:
            config = {k: v for k, v in dict(component.config).items() if not k.startswith("_")}
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
        else:
            continue
        digests[name] = h.hexdigest()[:16]
    return digests
