"""Recipes: TOML (or JSON) files that say everything a training run needs.

A recipe has top-level keys (``method``, ``teacher``, ``seed``, ``out``, ``name``) and sections:

* ``[student]``, ``[data]``, ``[train]``, ``[loading]`` (how the teacher is loaded: dtype, variant, revision,
  replaced components, single-file config, attention) -- in every recipe;
* ``[<method>]`` -- the method's own options (``[dmd2]``, ``[sid]``, ...: its ``Options`` dataclass);
* ``[critic]`` -- for methods with the fake-score critic (DMD, DMD2, SiD);
* ``[optim.<group>]`` -- the optimizer of each of the method's groups (``generator``, ``critic``, ...),
  starting from the method's own defaults.

Every key has a default (see :func:`describe_options`), so a recipe lists only what it changes.
Shipped recipes live in ``fastgen/train/recipes/*.toml``; ``load_recipe("dmd2_fmnist_1step",
["train.steps=2000", "optim.critic.lr=2e-4"])`` loads one with overrides, each ``dotted.key=value``
with ``value`` parsed as TOML (``3``, ``2e-4``, ``true``, ``[999, 499]``, ``"text"``; a bare word is
taken as a string). A run's resolved ``recipe.json`` loads the same way. Unknown keys, sections of
another method and invalid values are one-line errors that name the valid choices.
"""

from __future__ import annotations

import copy
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport has the same API
    import tomli as tomllib

from fastgen.critic import CriticOptions
from fastgen.methods import DistillationMethod, OptimizerOptions, StudentOptions, get_method, method_names
from fastgen.methods.base import option, option_default
from fastgen.pipelines.loading import LoadOptions

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class RecipeError(ValueError):
    """A recipe (file or ``--set`` override) that cannot be run: the message names the key and the valid choices."""
DEFAULT_METHOD = "dmd2"


@dataclass
class DataOptions:
    """Training data. Recipe: ``[data]``."""

    prompts: str = option("zoo", "prompt list: a text file with one prompt per line, or 'zoo' (the zoo's class prompts)")
    real: str = option("", "real images for methods that need them (GAN losses): '' (none, data-free), 'zoo' (the zoo "
                           "teacher's dataset) or an image folder (any sizes: streamed, resized and center-cropped to "
                           "the teacher's resolution)")
    max_real_images: int = option(10000, "use at most this many real images")
    resolution: int = option(0, "image height = width in pixels to train at (0: the teacher pipeline's default); "
                                "transformer teachers only (SD3, Flux: FluxPipeline's default is 1024)")
    num_workers: int = option(2, "DataLoader processes that read and resize an image folder (0: the training process)")

    def validate(self) -> None:
        if self.max_real_images < 1:
            raise ValueError(f"max_real_images must be >= 1, got {self.max_real_images}.")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0 (0: the teacher's default), got {self.resolution}.")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}.")


@dataclass
class TrainOptions:
    """The training loop. Recipe: ``[train]``."""

    steps: int = option(1000, "training iterations")
    batch_size: int = option(64, "student samples per iteration (per process)")
    grad_accum: int = option(1, "gradient accumulation micro-batches per iteration")
    mixed_precision: str = option("", "'' (accelerate's config: `accelerate config`, `accelerate launch "
                                      "--mixed_precision`, ACCELERATE_MIXED_PRECISION; else 'no'), 'no', 'bf16' or "
                                      "'fp16'")
    max_grad_norm: float = option(10.0, "gradient clipping per optimizer group (0: none)")
    checkpoint_every: int = option(500, "checkpoint every N steps (0: never)")
    keep_checkpoints: int = option(2, "checkpoints to keep")
    log_every: int = option(50, "log smoothed losses every N steps")
    eval_every: int = option(0, "evaluate the student every N steps (zoo teachers; 0: never)")
    eval_images: int = option(500, "images per evaluation")
    trackers: list = option([], "accelerate trackers, e.g. ['tensorboard'] or ['wandb']")
    progress: bool = option(True, "show a progress bar")
    trained_dtype: str = option("fp32", "dtype the trained copies (student, critic, their adapters) are kept in: fp32 "
                                        "(master weights; a teacher loaded in bf16/fp16 then needs mixed precision), "
                                        "bf16 or fp16")
    gradient_checkpointing: bool = option(False, "recompute the networks' activations in the backward pass (student, "
                                                 "critic, and the frozen teacher where gradients flow through it; "
                                                 "diffusers' enable_gradient_checkpointing): less memory, more time")
    export_lora: bool = option(True, "LoRA students: also write the adapter as pytorch_lora_weights.safetensors "
                                     "(for pipelines with a LoRA loader, e.g. StableDiffusionPipeline)")

    def validate(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "keep_checkpoints": self.keep_checkpoints, "eval_images": self.eval_images}
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ValueError(f"{', '.join(bad)} must be >= 1, got {', '.join(str(v) for v in bad.values())}.")
        never_negative = {"checkpoint_every": self.checkpoint_every, "log_every": self.log_every,
                          "eval_every": self.eval_every}
        bad = {k: v for k, v in never_negative.items() if v < 0}
        if bad:
            raise ValueError(f"{', '.join(bad)} must be >= 0 (0: never), got {', '.join(str(v) for v in bad.values())}.")
        if self.mixed_precision not in ("", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be '' (accelerate's config), 'no', 'bf16' or 'fp16', not "
                             f"{self.mixed_precision!r}.")
        if self.trained_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"trained_dtype must be fp32, bf16 or fp16, not {self.trained_dtype!r}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}.")


# Sections every recipe has, and the shared sections a method may declare in its ``sections``.
COMMON_SECTIONS = {"student": StudentOptions, "data": DataOptions, "train": TrainOptions, "loading": LoadOptions}
SHARED_SECTIONS = {"student": StudentOptions, "critic": CriticOptions}
TOP_KEYS = {"method": (str, DEFAULT_METHOD, "distillation method: " + "the name of a registered method"),
            "teacher": (str, "fmnist-ldm", "teacher: a zoo name, a diffusers pipeline folder or a hub id"),
            "seed": (int, 0, "random seed"),
            "out": (str, "", "run folder (default: runs/<recipe name>)"),
            "name": (str, "", "recipe name (default: the file name)")}
# Keys that moved to another section, for a hint in the error.
MOVED = {f"{s}.{k}": f"optim.{g}.{k}" for s, g in (("student", "generator"), ("critic", "critic"))
         for k in ("lr", "betas", "weight_decay", "warmup_steps")}


@dataclass
class Recipe:
    """A resolved recipe: top-level keys, the shared sections, the method's options and its optimizers."""

    method: str = DEFAULT_METHOD
    teacher: str = "fmnist-ldm"
    seed: int = 0
    out: str = ""
    name: str = ""
    student: StudentOptions = field(default_factory=StudentOptions)
    critic: CriticOptions | None = None
    options: object = None
    optim: dict[str, OptimizerOptions] = field(default_factory=dict)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    loading: LoadOptions = field(default_factory=LoadOptions)

    @property
    def method_class(self) -> type[DistillationMethod]:
        return get_method(self.method)

    def to_dict(self) -> dict:
        """The whole recipe as nested dicts (``recipe.json``); :func:`load_recipe` reads it back."""
        out = {k: getattr(self, k) for k in TOP_KEYS}
        out["student"] = asdict(self.student)
        if self.critic is not None:
            out["critic"] = asdict(self.critic)
        out[self.method] = asdict(self.options)
        out["optim"] = {group: asdict(o) for group, o in self.optim.items()}
        out["data"], out["train"], out["loading"] = asdict(self.data), asdict(self.train), asdict(self.loading)
        return out

    def flat(self) -> dict:
        """``{"train.steps": 1000, "optim.critic.lr": 2e-4, ...}`` (for trackers and logs)."""
        return flatten(self.to_dict())


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested recipe data as ``{"section.key": value}`` (``optim.<group>.key`` for optimizer groups)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


# --- parsing --------------------------------------------------------------------------------------
def _hint_name(hint) -> str:
    if hint in (int, float, str, bool, list):
        return hint.__name__
    return "float" if "float" in str(hint) else str(hint)


def _check_type(key: str, value, default, hint: str, optional: bool = False):
    """Type check of one value against its field (ints are accepted for floats). ``None`` (JSON's null: a run's
    ``recipe.json`` writes unset optional keys so) is accepted for ``optional`` fields only, and so is the string
    ``"none"``: TOML has no null, so ``--set sid.guidance_scale=none`` is how a command line unsets such a key."""
    if optional and isinstance(value, str) and value.lower() == "none":
        value = None
    if value is None:
        if optional:
            return None
        raise ValueError(f"Recipe key {key!r} cannot be empty.")
    if isinstance(default, bool) or hint == "bool":
        ok = isinstance(value, bool)
    elif hint == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint == "str":
        ok = isinstance(value, str)
    elif hint == "list":
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise ValueError(f"Recipe key {key!r} expects {hint}, got {value!r} ({type(value).__name__}).")
    return value


def _fill(obj, values: dict, section: str, origin: str):
    """Set the fields of dataclass ``obj`` from ``values`` (a recipe section), type-checked; returns ``obj``."""
    if not isinstance(values, dict):
        raise ValueError(f"{origin}: [{section}] must be a section (a table).")
    known = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in known:
            moved = MOVED.get(f"{section}.{key}")
            hint = f" It moved to [{moved.rsplit('.', 1)[0]}] {moved.rsplit('.', 1)[1]}." if moved else ""
            raise RecipeError(f"{origin}: unknown recipe key '{section}.{key}'.{hint} Valid keys in [{section}]: "
                           f"{', '.join(known) or 'none'}.")
        optional = type(None) in typing.get_args(hints[key])
        setattr(obj, key, _check_type(f"{section}.{key}", value, option_default(known[key]), _hint_name(hints[key]),
                                      optional))
    return obj


def _validate(obj, section: str, origin: str) -> None:
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as err:
            raise RecipeError(f"{origin}: [{section}] {err}") from None


def build_recipe(data: dict, origin: str = "recipe", name: str = "") -> Recipe:
    """A :class:`Recipe` from parsed recipe data (nested dicts), validated; ``origin`` names it in errors."""
    data = dict(data)
    for key, (typ, _, _) in TOP_KEYS.items():
        if key in data and (not isinstance(data[key], typ) or isinstance(data[key], bool)):
            raise ValueError(f"{origin}: recipe key {key!r} expects {typ.__name__}, got {data[key]!r}.")
    method_name = data.get("method", DEFAULT_METHOD)
    try:
        cls = get_method(method_name)
    except KeyError as err:
        raise RecipeError(f"{origin}: {err.args[0]}") from None
    recipe = Recipe(**{k: data.get(k, default) for k, (_, default, _) in TOP_KEYS.items()})
    recipe.name = recipe.name or name
    recipe.critic = CriticOptions() if "critic" in cls.sections else None
    recipe.options = cls.Options()
    recipe.optim = {group: copy.deepcopy(o) for group, o in cls.optimizer_defaults.items()}
    for key, value in data.items():
        if key in TOP_KEYS:
            continue
        if key == cls.name:
            _fill(recipe.options, value, key, origin)
        elif key in COMMON_SECTIONS or (key in SHARED_SECTIONS and key in cls.sections):
            _fill(getattr(recipe, key), value, key, origin)
        elif key == "optim":
            if not isinstance(value, dict):
                raise ValueError(f"{origin}: [optim] must hold one table per optimizer group, e.g. [optim.generator].")
            for group, table in value.items():
                if group not in recipe.optim:
                    raise RecipeError(f"{origin}: unknown optimizer group [optim.{group}]; method {cls.name!r} trains "
                                   f"{', '.join(recipe.optim)}.")
                _fill(recipe.optim[group], table, f"optim.{group}", origin)
        elif key in method_names():
            raise RecipeError(f"{origin}: section [{key}] holds options of method {key!r}, but the recipe's method is "
                           f"{cls.name!r}; put its options in [{cls.name}] (valid keys: "
                           f"{', '.join(f.name for f in fields(recipe.options)) or 'none'}), or set method = \"{key}\".")
        elif key in SHARED_SECTIONS:
            raise RecipeError(f"{origin}: method {cls.name!r} has no [{key}] section (it reads "
                           f"{', '.join(f'[{s}]' for s in _sections(cls))}).")
        else:
            raise RecipeError(f"{origin}: unknown recipe key {key!r}. Valid top-level keys: {', '.join(TOP_KEYS)}; "
                           f"sections for method {cls.name!r}: {', '.join(f'[{s}]' for s in _sections(cls))}.")
    for section in _sections(cls):
        if section == "optim":
            for group, o in recipe.optim.items():
                _validate(o, f"optim.{group}", origin)
        else:
            _validate(recipe.options if section == cls.name else getattr(recipe, section), section, origin)
    try:
        cls.check_recipe(recipe.options, recipe.student)
    except ValueError as err:
        raise RecipeError(f"{origin}: {err}") from None
    return recipe


def _sections(cls) -> list[str]:
    """The sections a recipe of method ``cls`` may have."""
    shared = [s for s in SHARED_SECTIONS if s in cls.sections and s not in COMMON_SECTIONS]
    return [*COMMON_SECTIONS, *shared, cls.name, "optim"]


def parse_override(text: str) -> dict:
    """``"train.steps=2000"`` -> ``{"train": {"steps": 2000}}`` (the value parsed as TOML, else a string);
    optimizer keys take three parts: ``"optim.critic.lr=2e-4"``."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like key=value, e.g. train.steps=2000.")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"Override {text!r} has no valid key (e.g. train.steps=2000).")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    if len(parts) > (3 if parts[0] == "optim" else 2):
        raise RecipeError(f"Override key {key!r} is nested too deep; use section.key (e.g. train.steps) or "
                       f"optim.<group>.key.")
    for part in reversed(parts):
        value = {part: value}
    return value


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(recipe: str | Path) -> Path:
    """A shipped recipe name (``dmd2_fmnist_1step``) or a path to a ``.toml`` / ``.json`` file."""
    path = Path(recipe)
    if path.suffix in (".toml", ".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"Recipe file {recipe} not found.")
        return path
    shipped = RECIPES_DIR / f"{recipe}.toml"
    if not shipped.is_file():
        raise FileNotFoundError(f"Unknown recipe {recipe!r}; shipped recipes: {', '.join(available_recipes())} "
                                "(or give a path to a .toml file, or a run's recipe.json).")
    return shipped


def read_recipe_file(path: Path) -> dict:
    """The raw data of a recipe file (TOML, or a run's ``recipe.json``)."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from None


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe (shipped name, TOML path or a run's ``recipe.json``) and apply ``key=value`` overrides."""
    path = recipe_path(recipe)
    data = read_recipe_file(path)
    for text in overrides:
        _merge(data, parse_override(text))
    origin = str(path) + (f" (with --set {', '.join(overrides)})" if overrides else "")
    name = path.stem if path.suffix == ".toml" else ""
    return build_recipe(data, origin, name or path.parent.name)


def _describe(prefix: str, obj) -> list[str]:
    hints = typing.get_type_hints(type(obj))
    return [f"  {prefix}{f.name} ({_hint_name(hints[f.name])}, default {getattr(obj, f.name)!r}): "
            f"{f.metadata.get('help', '')}" for f in fields(obj)]


def describe_options() -> str:
    """Every recipe key with its type, default and meaning (for ``fastgen train --help``)."""
    lines = [f"  {k} ({typ.__name__}, default {default!r}): {text}" for k, (typ, default, text) in TOP_KEYS.items()]
    lines[0] = lines[0].replace("the name of a registered method", ", ".join(method_names()))
    for section, cls in COMMON_SECTIONS.items():
        lines += [f"[{section}]", *_describe(f"{section}.", cls())]
    lines += ["[critic] (methods with the fake-score critic: " +
              ", ".join(n for n in method_names() if "critic" in get_method(n).sections) + ")",
              *_describe("critic.", CriticOptions())]
    for name in method_names():
        cls = get_method(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"[{name}]  {doc}", *_describe(f"{name}.", cls.Options())]
        for group, o in cls.optimizer_defaults.items():
            ema = " (its EMA is exported)" if group == cls.ema_group else ""
            lines.append(f"  [optim.{group}]{ema}: " + ", ".join(f"{f.name} {getattr(o, f.name)!r}" for f in fields(o)))
    return "\n".join(lines)


__all__ = ["Recipe", "RecipeError", "flatten",
           "DataOptions", "TrainOptions", "load_recipe", "build_recipe", "parse_override",
           "describe_options", "available_recipes", "recipe_path", "RECIPES_DIR"]
