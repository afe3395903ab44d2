"""Recipes: TOML files (stdlib ``tomllib``) that say everything a training run needs.

A recipe has top-level keys (``method``, ``teacher``, ``seed``, ``out``) and sections ``[student]``,
``[critic]``, ``[dmd]``, ``[data]``, ``[train]``. Every key has a default (see :func:`describe_options`),
so a recipe lists only what it changes. Shipped recipes live in ``fastgen/train/recipes/*.toml``;
``load_recipe("dmd2_fmnist_1step", ["train.steps=2000", "dmd.ratio=10"])`` loads one with overrides,
each ``dotted.key=value`` with ``value`` parsed as TOML (``3``, ``2e-4``, ``true``, ``[999, 499]``,
``"text"``; a bare word is taken as a string). Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import tomllib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def _opt(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class StudentOptions:
    num_steps: int = _opt(1, "student sampling steps; timesteps = fastgen.pipelines.sampler.student_timesteps(schedule, "
                             "num_steps), e.g. [999, 749, 499, 249] for 4")
    timesteps: list = _opt([], "explicit descending timesteps (overrides num_steps), each in [0, T-1]")
    lora_rank: int = _opt(0, "0: full copy of the teacher network; > 0: LoRA adapter 'student' of this rank on the "
                             "frozen teacher")
    lora_alpha: float = _opt(0.0, "LoRA alpha (0: equal to the rank)")
    lr: float = _opt(5e-5, "AdamW learning rate")
    betas: list = _opt([0.9, 0.999], "AdamW betas")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_steps: int = _opt(500, "linear warm-up, in updates of the generator")
    ema_decay: float = _opt(0.0, "EMA decay of the student's weights (0: no EMA); the EMA is exported")


@dataclass
class CriticOptions:
    lora_rank: int = _opt(0, "0: full copy of the teacher network; > 0: LoRA adapter 'critic' on the frozen teacher")
    lora_alpha: float = _opt(0.0, "LoRA alpha (0: equal to the rank)")
    lr: float = _opt(5e-5, "AdamW learning rate of the critic (and its GAN head)")
    betas: list = _opt([0.9, 0.999], "AdamW betas")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_steps: int = _opt(500, "linear warm-up, in critic updates")
    gan_head: bool = _opt(False, "add DMD2's GAN head on the critic's bottleneck (needs data.real)")
    weighting: str = _opt("own", "critic loss: 'own' (teacher's parameterisation, eps-MSE) or 'edm' (weighted x0-MSE)")
    t_min: float = _opt(0.0, "critic training timesteps t ~ U[t_min T, t_max T]")
    t_max: float = _opt(1.0, "see t_min")


@dataclass
class DMDOptions:
    guidance_scale: float | None = _opt(None, "teacher CFG in the distribution-matching gradient; default: "
                                              "fastgen.zoo.RECOMMENDED_GUIDANCE for zoo teachers, else none")
    ratio: int = _opt(5, "DMD2: critic updates per generator update (two time-scale rule)")
    gan_generator_weight: float = _opt(0.0, "DMD2: lambda_G of the generator's GAN loss (needs critic.gan_head)")
    gan_critic_weight: float = _opt(0.0, "DMD2: lambda_D of the critic's GAN loss (needs critic.gan_head)")
    dm_t_min: float = _opt(0.02, "distribution-matching timesteps t ~ U[dm_t_min T, dm_t_max T]")
    dm_t_max: float = _opt(0.98, "see dm_t_min")
    regression_weight: float = _opt(0.25, "DMD: lambda_reg of the regression loss on teacher ODE pairs")
    ode_pairs: int = _opt(1024, "DMD: number of cached teacher ODE pairs")
    ode_steps: int = _opt(50, "DMD: DDIM steps of the teacher ODE sampler for the pairs")
    pair_batch_size: int = _opt(0, "DMD: ODE pairs per batch (0: train.batch_size)")


@dataclass
class DataOptions:
    prompts: str = _opt("zoo", "prompt list: a text file with one prompt per line, or 'zoo' (the zoo's class prompts)")
    real: str = _opt("", "real images for GAN losses: '' (none, data-free), 'zoo' (the zoo teacher's dataset) or an "
                         "image folder at the teacher's resolution")
    max_real_images: int = _opt(10000, "use at most this many real images")


@dataclass
class TrainOptions:
    steps: int = _opt(1000, "training iterations")
    batch_size: int = _opt(64, "student samples per iteration (per process)")
    grad_accum: int = _opt(1, "gradient accumulation micro-batches per iteration")
    mixed_precision: str = _opt("no", "'no', 'bf16' or 'fp16'")
    max_grad_norm: float = _opt(10.0, "gradient clipping per network (0: none)")
    checkpoint_every: int = _opt(500, "checkpoint every N steps (0: never)")
    keep_checkpoints: int = _opt(2, "checkpoints to keep")
    log_every: int = _opt(50, "log smoothed losses every N steps")
    eval_every: int = _opt(0, "evaluate FD every N steps (zoo teachers; 0: never)")
    eval_images: int = _opt(500, "images per evaluation")
    trackers: list = _opt([], "accelerate trackers, e.g. ['tensorboard'] or ['wandb']")
    progress: bool = _opt(True, "show a progress bar")
    export_lora: bool = _opt(True, "LoRA students: also write the adapter as pytorch_lora_weights.safetensors")


SECTIONS = {"student": StudentOptions, "critic": CriticOptions, "dmd": DMDOptions, "data": DataOptions,
            "train": TrainOptions}


@dataclass
class Recipe:
    method: str = _opt("dmd2", "distillation method: 'dmd' or 'dmd2'")
    teacher: str = _opt("fmnist-ldm", "teacher: a zoo name, a diffusers pipeline folder or a hub id")
    seed: int = _opt(0, "random seed")
    out: str = _opt("", "run folder (default: runs/<recipe name>)")
    name: str = _opt("", "recipe name (default: the file name)")
    student: StudentOptions = field(default_factory=StudentOptions)
    critic: CriticOptions = field(default_factory=CriticOptions)
    dmd: DMDOptions = field(default_factory=DMDOptions)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)

    def to_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict:
        """``{"train.steps": 1000, ...}`` (for trackers and logs)."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


def _top_keys() -> list[str]:
    return [f.name for f in fields(Recipe) if f.name not in SECTIONS]


def _valid_keys(section: str | None) -> str:
    if section is None:
        return ", ".join(_top_keys()) + "; sections: " + ", ".join(f"[{s}]" for s in SECTIONS)
    return ", ".join(f.name for f in fields(SECTIONS[section]))


def _check_type(key: str, value, default, annotation):
    """Type check of one value against its field (ints are accepted for floats)."""
    hint = str(annotation)
    if value is None:
        raise ValueError(f"Recipe key {key!r} cannot be empty.")
    if isinstance(default, bool) or hint == "bool":
        ok = isinstance(value, bool)
    elif isinstance(default, int) and hint == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in hint:
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


def _apply(recipe: Recipe, data: dict, origin: str) -> None:
    hints = typing.get_type_hints(Recipe)
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{origin}: [{key}] must be a section (a table).")
            section = getattr(recipe, key)
            section_fields = {f.name: f for f in fields(section)}
            section_hints = typing.get_type_hints(type(section))
            for sub, sub_value in value.items():
                if sub not in section_fields:
                    raise KeyError(f"{origin}: unknown recipe key '{key}.{sub}'. Valid keys in [{key}]: "
                                   f"{_valid_keys(key)}.")
                f = section_fields[sub]
                default = f.default if f.default is not MISSING else f.default_factory()
                setattr(section, sub, _check_type(f"{key}.{sub}", sub_value, default, _hint_name(section_hints[sub])))
        elif key in _top_keys():
            f = next(f for f in fields(Recipe) if f.name == key)
            setattr(recipe, key, _check_type(key, value, f.default, _hint_name(hints[key])))
        else:
            raise KeyError(f"{origin}: unknown recipe key {key!r}. Valid top-level keys: {_valid_keys(None)}.")


def _hint_name(hint) -> str:
    if hint in (int, float, str, bool, list):
        return hint.__name__
    return "float" if "float" in str(hint) else str(hint)


def parse_override(text: str) -> dict:
    """``"train.steps=2000"`` -> ``{"train": {"steps": 2000}}`` (the value parsed as TOML, else a string)."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like key=value, e.g. train.steps=2000.")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ValueError(f"Override {text!r} has no key.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    if len(parts) > 2:
        raise KeyError(f"Override key {key!r} is nested too deep; use section.key (e.g. train.steps).")
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: {parts[1]: value}}


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(recipe: str | Path) -> Path:
    """A shipped recipe name (``dmd2_fmnist_1step``) or a path to a TOML file."""
    path = Path(recipe)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"Recipe file {recipe} not found.")
        return path
    shipped = RECIPES_DIR / f"{recipe}.toml"
    if not shipped.is_file():
        raise FileNotFoundError(f"Unknown recipe {recipe!r}; shipped recipes: {', '.join(available_recipes())} "
                                "(or give a path to a .toml file).")
    return shipped


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe (shipped name or TOML path) and apply ``key=value`` overrides."""
    path = recipe_path(recipe)
    result = Recipe(name=path.stem)
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
    _apply(result, data, str(path))
    for text in overrides:
        _apply(result, parse_override(text), f"--set {text}")
    return result


def describe_options() -> str:
    """Every recipe key with its type, default and meaning (for ``fastgen train --help``)."""
    lines = []

    def add(prefix, cls):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in SECTIONS and cls is Recipe:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} ({_hint_name(hints[f.name])}, default {default!r}): "
                         f"{f.metadata.get('help', '')}")

    add("", Recipe)
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        add(f"{name}.", cls)
    return "\n".join(lines)


__all__ = ["Recipe", "load_recipe", "parse_override", "describe_options", "available_recipes", "recipe_path",
           "SECTIONS", "RECIPES_DIR"]
