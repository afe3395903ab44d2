"""Export a student as a plain diffusers folder: a built-in pipeline class with a built-in scheduler that
reproduces fastgen's sampler.

``DiffusionPipeline.from_pretrained(folder)`` loads the result with no extra arguments, without fastgen
installed and without a warning, and its default call (``pipe(prompt)``, ``pipe()``) returns an image:

* multistep students (DMD2, LCM, SiD) -> ``LCMScheduler`` whose ``set_timesteps(N)`` gives the trained
  timesteps for the trained N, and whose ``original_inference_steps`` (the grid the N steps are taken from)
  is as fine as that allows, so that the pipeline's default N (50) and any N up to the grid's size run too;
  flow teachers -> ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``.
  A method that trains on a grid of its own (CD, LCM: ``t = j k - 1``) names it in its
  ``ExportSpec.scheduler_config`` as ``original_inference_steps``; that grid is used when it gives the trained
  timesteps.
* DDIM students (progressive distillation) -> ``DDIMScheduler(timestep_spacing="trailing",
  set_alpha_to_one=True)``, on the teacher's betas cut at ``N d`` for a trailing grid ``(N - i) d - 1`` with
  ``N d < T``; flow teachers -> ``FlowMatchEulerDiscreteScheduler``.
* The pipeline class is the teacher's, except ``DDPMPipeline``: its call has no ``timesteps`` argument and
  defaults to 1000 steps, which no built-in scheduler can map onto a student that starts below ``T - 1``
  (``set_timesteps(1000)`` starts at ``T - 1`` or raises). Its students are written as
  ``ConsistencyModelPipeline`` (same ``unet`` and ``scheduler`` components, a ``timesteps`` argument, default
  ``num_inference_steps=1``).

fastgen's metadata (method, trained timesteps, recommended guidance, the exact call) is written to
``fastgen.json`` beside ``model_index.json`` (:data:`METADATA_FILE`); :func:`read_metadata` also reads folders
written before, which kept it under a ``"fastgen"`` key of ``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Sequence

import torch

from fastgen import zoo
from fastgen.denoiser import check_guidance_scale
from fastgen.schedule import check_timesteps, is_flow_config

from .folders import writing_folder
from .generate import network_component
from .portable import make_portable
from .prompts import call_text, prompt_options, write_prompt_options

METADATA_FILE = "fastgen.json"
LEGACY_METADATA_KEY = "fastgen"  # where folders written before fastgen.json kept the metadata (scheduler config)
DISTRIBUTION = "fastgen-diffusion"  # the package index name of fastgen ("fastgen" there is another project)
PROJECT_URL = f"https://pypi.org/project/{DISTRIBUTION}/"  # the project's README, as the package index shows it
# The config keys through which a pipeline talks to its denoising network: a student must agree with the
# teacher's network on each (the layers inside may differ), or the exported folder cannot run.
INTERFACE_KEYS = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "addition_embed_type",
                  "projection_class_embeddings_input_dim", "encoder_hid_dim", "patch_size",
                  "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")
# Teacher pipelines whose call cannot run a few-step student, and the built-in pipeline their students become.
STUDENT_PIPELINE = {"DDPMPipeline": "ConsistencyModelPipeline"}


def student_pipeline_class(pipe) -> type:
    """The built-in pipeline class a student of ``pipe`` is written as (see :data:`STUDENT_PIPELINE`)."""
    import diffusers

    name = type(pipe).__name__
    return getattr(diffusers, STUDENT_PIPELINE[name]) if name in STUDENT_PIPELINE else type(pipe)


def default_steps(pipeline_class) -> int:
    """The ``num_inference_steps`` a pipeline class runs when the caller gives none (50 for Stable Diffusion)."""
    param = inspect.signature(pipeline_class.__call__).parameters.get("num_inference_steps")
    default = None if param is None else param.default
    return default if isinstance(default, int) else 1


def _schedule_argument(scheduler) -> str:
    """The call argument that gives a student's own schedule: ``sigmas`` for flow schedulers (given ``timesteps``,
    they derive shifted sigmas that disagree with them), ``timesteps`` otherwise."""
    return "sigmas" if type(scheduler).__name__.startswith("FlowMatch") else "timesteps"


def _accepts_timesteps(pipeline_class, scheduler) -> bool:
    argument = _schedule_argument(scheduler)
    return (argument in inspect.signature(pipeline_class.__call__).parameters
            and argument in inspect.signature(scheduler.set_timesteps).parameters)


def call_arguments(pipeline_class, scheduler, timesteps: list[int], custom: bool, guidance_scale: float | None) -> str:
    """The exact call arguments of a student, as the model card and ``fastgen.json`` write them."""
    if not custom:
        call = f"num_inference_steps={len(timesteps)}"
    elif _schedule_argument(scheduler) == "sigmas":
        T = scheduler.config.num_train_timesteps
        call = f"sigmas={[round(t / T, 8) for t in timesteps]}"
    else:  # ConsistencyModelPipeline warns when timesteps come with its default num_inference_steps=1
        none = "num_inference_steps=None, " if pipeline_class.__name__ == "ConsistencyModelPipeline" else ""
        call = f"{none}timesteps={timesteps}"
    return call if guidance_scale is None else call + f", guidance_scale={guidance_scale}"


def _config_for(cls, config: dict) -> dict:
    """The entries of a scheduler config that ``cls`` takes: others would be written into its config file and
    warned about at every load ("config attributes ... are not expected")."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in accepted}


def _set_timesteps(scheduler, n: int, **kwargs) -> list[int]:
    """The timesteps ``scheduler.set_timesteps(n)`` gives: what a pipeline called with N steps runs."""
    scheduler.set_timesteps(n, **kwargs)
    return [int(round(float(t))) for t in scheduler.timesteps]


def _cut_schedule(config: dict, num_train_timesteps: int) -> dict:
    """Scheduler config entries for the teacher's betas cut at ``num_train_timesteps`` (empty when that is its T).

    Pipelines without a ``timesteps`` argument only call ``set_timesteps(N)``, which always starts at ``T - 1``.
    Cutting the teacher's betas at ``t0 + 1`` keeps ``alphas_cumprod`` for every ``t <= t0`` unchanged, so
    ``set_timesteps(N)`` of the cut schedule starts at ``t0`` instead (and DDIM's step ``T // N`` becomes
    ``(t0 + 1) // N``)."""
    from diffusers import DDPMScheduler

    if num_train_timesteps == config.get("num_train_timesteps", 1000):
        return {}
    betas = DDPMScheduler.from_config(config).betas[:num_train_timesteps]
    return {"num_train_timesteps": num_train_timesteps, "trained_betas": betas.tolist()}


def unshifted_flow_scheduler(config: dict, **options):
    """A ``FlowMatchEulerDiscreteScheduler`` on a flow scheduler ``config`` that runs the sigmas it is passed as
    given: shift 1, no dynamic shifting, no sigma remapping (it shifts and remaps passed sigmas otherwise). A
    pipeline called with ``sigmas = t / T`` then runs timesteps ``t`` exactly, at any resolution. ``options``:
    further config entries (``stochastic_sampling``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(
        _config_for(FlowMatchEulerDiscreteScheduler, config), shift=1.0, use_dynamic_shifting=False,
        shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        invert_sigmas=False, **options)


def _lcm_grid(config: dict, timesteps: list[int], min_steps: int, preferred: int | None = None):
    """An ``LCMScheduler`` whose ``set_timesteps(len(timesteps))`` gives ``timesteps``, or ``None``.

    ``LCMScheduler.set_timesteps(N)`` takes N evenly spaced points (by index) of a grid of
    ``original_inference_steps`` = O timesteps ``k - 1, 2k - 1, ..., O k - 1`` with ``k = T // O``, and refuses
    N > O. The method's own grid ``preferred`` (CD/LCM: ``T // skip``, the grid it trained on) is tried first.
    Otherwise the largest O whose N points are the trained timesteps is chosen, so that calls with more steps than
    trained (the pipeline's default 50 included) run too, on the finest grid below the trained first timestep;
    O below ``min_steps`` (the pipeline's default N) is not accepted, the method's grid included. The teacher's
    schedule is tried first, then the schedule cut at ``t0 + 1`` (:func:`_cut_schedule`), whose grid can start at
    ``t0`` where the full one cannot (``t0 < T / 2``).
    """
    from diffusers import LCMScheduler

    n, t0 = len(timesteps), timesteps[0]
    T = config.get("num_train_timesteps", 1000)
    schedules = [{}] if t0 == T - 1 else [{}, _cut_schedule(config, t0 + 1)]
    candidates = []  # (schedule, its O in order): the method's grid on each schedule first, then the largest O
    if preferred is not None:
        # below min_steps the pipeline's default call (N = min_steps > O) would raise: then the largest O instead
        candidates += [(schedule, [preferred]) for schedule in schedules
                       if max(n, min_steps) <= preferred <= schedule.get("num_train_timesteps", T)]
    for schedule in schedules:
        size = schedule.get("num_train_timesteps", T)
        # the grid's first point O * (size // O) - 1 must be t0: only such O are asked
        candidates.append((schedule, [o for o in range(size, max(n, min_steps) - 1, -1) if o * (size // o) == t0 + 1]))
    for schedule, grids in candidates:
        if not grids:
            continue
        scheduler = LCMScheduler.from_config(_config_for(LCMScheduler, config), **schedule,
                                             original_inference_steps=grids[0], set_alpha_to_one=True)
        for o in grids:
            if _set_timesteps(scheduler, n, original_inference_steps=o) == timesteps:
                scheduler.register_to_config(original_inference_steps=o)
                return scheduler
    return None


def _custom_lcm(config: dict, timesteps: list[int]):
    """The ``LCMScheduler`` for timesteps that need ``timesteps=`` in the call: the schedule cut at ``t0 + 1``
    with a grid of every timestep, so LCM's own checks accept them (first timestep = its T - 1, all on its grid)
    and the default call runs the finest schedule below ``t0``."""
    from diffusers import LCMScheduler

    t0, T = timesteps[0], config.get("num_train_timesteps", 1000)
    cut = _cut_schedule(config, t0 + 1)
    return LCMScheduler.from_config(_config_for(LCMScheduler, config), **cut,
                                    original_inference_steps=cut.get("num_train_timesteps", T), set_alpha_to_one=True)


def _built_in_scheduler(teacher_config: dict, timesteps: list[int], sampler: str, min_steps: int,
                        overrides: dict | None = None):
    """The diffusers scheduler that reproduces fastgen's sampler, and the timesteps its ``set_timesteps(N)`` gives.

    ``overrides``: config keys of the student's own (``prediction_type``, ``timestep_scaling``,
    ``original_inference_steps``, ...)."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in teacher_config.items() if not k.startswith("_") and k != LEGACY_METADATA_KEY}
    config.pop("original_inference_steps", None)  # a teacher's own LCM grid says nothing about the student's
    config.update(overrides or {})
    preferred = config.pop("original_inference_steps", None)  # the method's grid (ExportSpec.scheduler_config)
    n = len(timesteps)
    T = config.get("num_train_timesteps", 1000)
    if is_flow_config(teacher_config):
        # shift 1, no dynamic shifting and no sigma remapping: the call's sigmas= are then the trained t / T as given
        # (the scheduler shifts sigmas it is passed), at any resolution. stochastic_sampling is the multistep
        # sampler (x0 = x_t - sigma v, re-noised with fresh noise to the next sigma; FlowMatchLCMScheduler's step
        # without its scale factors), plain Euler the DDIM one.
        scheduler = unshifted_flow_scheduler(config, stochastic_sampling=(sampler == "multistep"))
        scheduler.set_timesteps(n)
        return scheduler, [float(t) for t in scheduler.timesteps]
    elif sampler == "multistep":
        scheduler = _lcm_grid(config, timesteps, min_steps, preferred) or _custom_lcm(config, timesteps)
    elif sampler == "ddim":
        # DDIMScheduler steps from t to t - T'//N, so it reproduces the trailing grid t_i = (N - i) d - 1 of
        # T' = N d (its own for d = T // N when N divides T; with the betas cut at T' < T otherwise)
        d = timesteps[-1] + 1
        if timesteps != [(n - i) * d - 1 for i in range(n)] or n * d > T:
            raise ValueError(
                f"DDIMScheduler steps from t to t - T//N, so it reproduces only evenly spaced trailing timesteps "
                f"t_i = (N - i) d - 1 with N d <= T = {T} (the betas are cut at N d < T); got {timesteps}.")
        scheduler = DDIMScheduler.from_config(_config_for(DDIMScheduler, config), **_cut_schedule(config, n * d),
                                              timestep_spacing="trailing", set_alpha_to_one=True)
    else:
        raise ValueError(f"Unknown sampler {sampler!r}; expected 'multistep' or 'ddim'.")
    return scheduler, _set_timesteps(scheduler, n)


def exported_scheduler(pipe, timesteps: Sequence[int], sampler: str = "multistep", overrides: dict | None = None):
    """``(scheduler, custom)``: the built-in scheduler the export writes for these trained timesteps, and
    whether the pipeline must be called with ``timesteps=`` (``set_timesteps(N)`` gives others).
    ``overrides``: the student's own scheduler settings (``ExportSpec.scheduler_config``).

    Raises ``ValueError`` when that is needed but the student's pipeline or scheduler takes no ``timesteps``:
    such a student could not be reproduced from its folder.
    """
    config = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
    flow = is_flow_config(config)
    ts = check_timesteps(timesteps, config.get("num_train_timesteps", 1000), continuous=flow)
    pipeline_class = student_pipeline_class(pipe)
    scheduler, default = _built_in_scheduler(config, ts, sampler, default_steps(pipeline_class), overrides)
    custom = flow or default != ts  # flow: always sigmas= (pipelines choose their own sigmas for N steps)
    if custom and not _accepts_timesteps(pipeline_class, scheduler):
        raise ValueError(
            f"{pipeline_class.__name__} with {type(scheduler).__name__} cannot be called with custom timesteps, and "
            f"set_timesteps({len(ts)}) gives {default}, not {ts}. Train with student.num_steps "
            f"(fastgen.pipelines.sampler.student_timesteps) or timesteps that set_timesteps(N) gives.")
    return scheduler, custom


def check_student_network(pipe, network_name: str, model: torch.nn.Module) -> None:
    """Raise a one-line ``ValueError`` when ``model`` cannot stand in for the pipeline's ``network_name``:
    another class, or another interface (channels, size, conditioning width: :data:`INTERFACE_KEYS`)."""
    teacher = pipe.components[network_name]
    if type(model).__name__ != type(teacher).__name__:
        raise ValueError(f"The student network is a {type(model).__name__}, but {type(pipe).__name__}'s {network_name} "
                         f"is a {type(teacher).__name__}: it comes from another teacher.")
    ours, theirs = dict(getattr(model, "config", {})), dict(teacher.config)
    differ = [f"{k} {ours.get(k)!r} (the teacher's: {theirs.get(k)!r})" for k in INTERFACE_KEYS
              if k in theirs and ours.get(k) != theirs.get(k)]
    if differ:
        raise ValueError(f"The student network does not fit {type(pipe).__name__}'s {network_name}: "
                         f"{', '.join(differ)}; it comes from another teacher.")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def teacher_reference(pipe) -> tuple[str, str | None]:
    """``(name, hub_id)`` of a teacher pipeline for the metadata and model card, with no local path in them: the
    zoo name (``fmnist-ldm``), the hub id it was loaded from, directly or as a folder of the hub cache (also
    returned as ``hub_id``), or the last part of a local folder's path; ``"teacher"`` for a pipeline built in
    memory."""
    source = str(getattr(pipe, "name_or_path", None) or "")
    if not source:
        return "teacher", None
    if Path(source).exists():
        cached = [p.name[len("models--"):] for p in Path(source).resolve().parents if p.name.startswith("models--")]
        if cached:  # a snapshot folder of the hub cache: .../models--owner--name/snapshots/<revision>
            hub_id = cached[0].replace("--", "/", 1)
            return hub_id, hub_id
        return zoo.name_of(source) or Path(source).resolve().name, None
    if HUB_ID.match(source):
        return source, source
    return Path(source).name or "teacher", None


def teacher_license(pipe, hub_id: str | None) -> str | None:
    """The ``license`` of the teacher's model card (its folder's README.md, or the hub's), ``None`` if unknown."""
    from huggingface_hub import ModelCard

    source = str(getattr(pipe, "name_or_path", None) or "")
    card_file = Path(source) / "README.md"
    try:
        if source and card_file.is_file():
            return ModelCard.load(card_file).data.license
        if hub_id is not None:
            return ModelCard.load(hub_id).data.license
    except Exception:  # noqa: BLE001 -- offline, no card, a card without YAML: the license is unknown, not an error
        return None
    return None


def _model_card(pipe_class: str, scheduler_class: str, meta: dict, call: str, is_text: bool, hub_id: str | None,
                license_id: str | None, absent: Sequence[str] = ()) -> str:
    """The student's README.md: Hugging Face model-card YAML, the exact call, what other step counts do."""
    example = 'pipe("a photo of a sneaker", ' if is_text else "pipe("
    tag = "text-to-image" if is_text else "unconditional-image-generation"
    lines = ["---", "library_name: diffusers", f"pipeline_tag: {tag}"]
    if hub_id is not None:
        lines.append(f"base_model: {hub_id}")
    lines.append(f"license: {license_id or 'other'}")
    lines += ["tags:", "- fastgen", "- distillation", f"- {meta['method']}", f"- {meta['num_steps']}-step", "---"]
    licence_note = "" if license_id else (f"\nLicense: the weights derive from the teacher `{meta['teacher']}`, whose "
                                          "license applies (its model card states none that fastgen could read).\n")
    # SD3 and Flux call scheduler.step without their generator: a multistep flow student's re-noising draws from
    # torch's global generator, so the card seeds it too
    global_seed = ("torch.manual_seed(0)  # the pipeline re-noises between steps with torch's global generator\n"
                   if scheduler_class.startswith("FlowMatch") and meta["sampler"] == "multistep" else "")
    return "\n".join(lines) + f"""

# {meta['num_steps']}-step {meta['method']} student of `{meta['teacher']}`

Distilled with [fastgen]({PROJECT_URL}) (`pip install {DISTRIBUTION}`; method: `{meta['method']}`). This is a plain
`{pipe_class}` with a `{scheduler_class}`; fastgen is not needed to run it.
{licence_note}
```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder"{"".join(f", {name}=None" for name in absent)})
{global_seed}image = {example}{call}, generator=torch.Generator().manual_seed(0)).images[0]
```

The student was trained for these timesteps ({meta['timesteps']}) and guidance scale ({meta['guidance_scale']};
guidance at or below 1 disables classifier-free guidance). Pipeline call defaults cannot be changed by a config
file, so pass these arguments; other step counts run too (the scheduler spreads N steps below the first trained
timestep), but only the trained call is what the student learned. With fastgen installed,
`fastgen.pipelines.FewStepPipeline.from_pretrained(folder)(prompt)` uses these defaults by itself.

fastgen metadata (`{METADATA_FILE}`):

```json
{json.dumps(meta, indent=2)}
```
"""


def _tcd_note(call: str, is_text: bool, takes_eta: bool) -> str:
    """The model card's paragraph on TCD sampling of a multistep (``LCMScheduler``) student."""
    example = 'pipe("a photo of a sneaker", ' if is_text else "pipe("
    eta = ", eta=0.3" if takes_eta else ""
    how = ("`eta` sets gamma" if takes_eta else
           "the pipeline passes no `eta`, so `TCDScheduler`'s default gamma 0.3 applies")
    return f"""
## TCD sampling

The same folder also samples with diffusers' `TCDScheduler` (strategic stochastic sampling, Zheng et al. 2024;
gamma in [0, 1], 0: deterministic), on the same timesteps; {how}. Whether it beats the plain call at a step
count is the student's to show: `fastgen eval path/to/this/folder --gamma 0.3` measures it.

```python
from diffusers import TCDScheduler

pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
image = {example}{call}{eta}, generator=torch.Generator().manual_seed(0)).images[0]
```
"""


def pipeline_kwargs(pipeline_class, components: dict, config: dict) -> dict:
    """The arguments that build ``pipeline_class`` from ``components`` and a pipeline ``config``
    (``requires_safety_checker``, ...): those it takes; a component it requires that is missing is ``None``."""
    params = inspect.signature(pipeline_class.__init__).parameters
    kwargs = {name: components.get(name) for name in params if name != "self" and
              params[name].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) and
              (name in components or params[name].default is inspect.Parameter.empty)}
    for name in params:
        if name not in kwargs and name in config and not name.startswith("_"):
            kwargs[name] = config[name]
    if "requires_safety_checker" in params and kwargs.get("safety_checker") is None:
        kwargs["requires_safety_checker"] = False  # no checker: nothing to require (and no warning at every load)
    return kwargs


def export_student(teacher, out_dir: str | Path, *, model: torch.nn.Module | None = None,
                   timesteps: Sequence[int], sampler: str = "multistep", method: str = "student",
                   guidance_scale: float = 0.0, extra_metadata: dict | None = None,
                   scheduler_config: dict | None = None) -> Path:
    """Write a student as a plain diffusers folder.

    Args:
        teacher: the teacher pipeline (loaded) or its folder / hub id; supplies every component
            but the denoising network.
        out_dir: folder to write.
        model: the student network (same class as the teacher's ``unet`` / ``transformer``). A peft
            LoRA student must be fused first (:func:`fastgen.pipelines.lora.fuse_student`).
        timesteps: the trained, descending network timesteps, e.g. ``[999, 749, 499, 249]``.
        sampler: ``"multistep"`` (x0 then re-noise) or ``"ddim"``.
        method: name recorded in the metadata and model card.
        guidance_scale: the guidance to call the student with (0 for guidance-distilled students; for students
            with a guidance embedding, the ``W`` the pipeline embeds).
        extra_metadata: more entries for ``fastgen.json`` (recipe, training steps, ...).
        scheduler_config: the student's own scheduler settings, e.g. ``{"prediction_type": "v_prediction"}``
            (default: the teacher's).
    Returns:
        ``out_dir`` as a Path. It is written into a temporary folder and renamed into place, so a kill
        leaves the previous folder (or none), never a half-written one; an existing folder is replaced
        only if it is a pipeline folder (``model_index.json``).
    Raises:
        ValueError: ``model`` is not a network of this teacher's kind, the timesteps cannot be reproduced
            by a built-in scheduler, or ``out_dir`` is a file or an unrelated folder.
    """
    from .loading import load_pipeline

    check_guidance_scale(guidance_scale)
    pipe = load_pipeline(str(teacher), what="Teacher") if isinstance(teacher, (str, Path)) else teacher
    network_name = network_component(pipe)
    teacher_config = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
    timesteps = check_timesteps(timesteps, teacher_config.get("num_train_timesteps", 1000),
                                continuous=is_flow_config(teacher_config))
    scheduler, custom = exported_scheduler(pipe, timesteps, sampler, scheduler_config)
    pipeline_class = student_pipeline_class(pipe)
    is_text = hasattr(pipe, "encode_prompt")
    call = call_arguments(pipeline_class, scheduler, timesteps, custom, guidance_scale if is_text else None)
    name, hub_id = teacher_reference(pipe)
    meta = {"method": method, "sampler": sampler, "num_steps": len(timesteps), "timesteps": timesteps,
            "guidance_scale": guidance_scale, "teacher": name, "call": call, **(extra_metadata or {})}

    components = dict(pipe.components)
    if model is not None:
        if hasattr(model, "peft_config"):
            raise ValueError("The student still carries peft adapters; fuse them first with "
                             "fastgen.pipelines.lora.fuse_student(model).")
        check_student_network(pipe, network_name, model)
        components[network_name] = model
    components["scheduler"] = scheduler
    student = pipeline_class(**pipeline_kwargs(pipeline_class, components, dict(pipe.config)))
    size = getattr(pipe, "default_sample_size", None)  # the trained latent size (fastgen's data.resolution)...
    if size is not None and getattr(student, "default_sample_size", size) != size:  # ... not the call's default
        pixels = size * student.vae_scale_factor
        meta["call"] = call = f"{call}, height={pixels}, width={pixels}"
        meta["resolution"] = pixels  # what FewStepPipeline and fastgen eval generate at (trained_resolution)
    options = prompt_options(pipe)  # prompt arguments the teacher's call needs (fmnist-flow: max_sequence_length=0)
    if options:
        meta["call"] = call = call + call_text(options)
    # components the teacher has none of (SD3 without T5) that the class does not list as optional: diffusers
    # reloads the folder only when they are passed as None again, so the card's load line passes them
    absent = [name for name, value in pipeline_kwargs(pipeline_class, components, dict(pipe.config)).items()
              if value is None and name in components and name not in pipeline_class._optional_components]
    if absent:
        meta["load"] = {name: None for name in absent}
    card = _model_card(pipeline_class.__name__, type(scheduler).__name__, meta, call, is_text, hub_id,
                       teacher_license(pipe, hub_id), absent)
    if type(scheduler).__name__ == "LCMScheduler":
        card += _tcd_note(call, is_text, "eta" in inspect.signature(pipeline_class.__call__).parameters)
    with writing_folder(out_dir, marker="model_index.json", what="Student folder") as tmp:
        student.save_pretrained(tmp)
        write_prompt_options(tmp, options)
        make_portable(student, tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
    return Path(out_dir)


def read_metadata(folder: str | Path) -> dict:
    """The fastgen metadata of an exported folder ({} for a pipeline folder fastgen did not write).

    Reads ``fastgen.json``, or the ``"fastgen"`` key of ``scheduler/scheduler_config.json`` in folders written
    before it existed. Raises ``FileNotFoundError`` for a path that is not a diffusers pipeline folder.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; is it a diffusers pipeline folder?")
    if (folder / METADATA_FILE).is_file():
        return json.loads((folder / METADATA_FILE).read_text())
    legacy = folder / "scheduler" / "scheduler_config.json"
    return json.loads(legacy.read_text()).get(LEGACY_METADATA_KEY, {}) if legacy.is_file() else {}


def trained_resolution(meta: dict) -> int | None:
    """The image height = width (pixels) a student was trained at, where its pipeline's call defaults to another
    (Flux: 128 latents; fastgen's ``data.resolution``): ``fastgen.json``'s ``resolution``, or in folders written
    before that key the ``height=`` of its call. ``None``: the pipeline's default size is the trained one."""
    if meta.get("resolution"):
        return int(meta["resolution"])
    found = re.search(r"\bheight=(\d+)", str(meta.get("call", "")))
    return int(found.group(1)) if found else None


def set_default_resolution(pipe, pixels: int, what: str) -> None:
    """Make ``pipe``'s call default to ``pixels`` x ``pixels`` images: its ``default_sample_size`` (latents), which
    the SDXL, SD3 and Flux pipelines read (SD3 and Flux also their resolution-dependent shift). A one-line
    ``ValueError`` naming ``what`` (the setting) for pipelines that generate at their network's ``sample_size``
    (``DDPMPipeline``, ``StableDiffusionPipeline``) or a size the latents cannot take (the VAE's factor times the
    transformer's patch -- Flux packs 2x2 -- or the UNet's downsampling)."""
    name = network_component(pipe)
    network = getattr(pipe, name, None)
    if network is None or not hasattr(pipe, "default_sample_size"):
        raise ValueError(f"{what} applies to pipelines whose call defaults to default_sample_size (SDXL, SD3, Flux); "
                         f"{type(pipe).__name__} generates at its network's sample_size: leave {what} out.")
    factor = getattr(pipe, "vae_scale_factor", None) or 1
    if name == "transformer":
        patch, unit = 2 * (getattr(network.config, "patch_size", None) or 1), "patch"
    else:
        patch, unit = 2 ** (len(network.config.block_out_channels) - 1), "downsampling"
    if pixels < 1 or pixels % (factor * patch):
        raise ValueError(f"{what} = {pixels} must be a multiple of {factor * patch} (the VAE's factor "
                         f"{factor} times the network's {unit} {patch}) for {type(pipe).__name__}.")
    pipe.default_sample_size = pixels // factor


def use_trained_resolution(pipe, meta: dict) -> None:
    """Make ``pipe`` (a student's built-in pipeline) generate at its trained resolution by default: its
    ``default_sample_size`` (latents) from :func:`trained_resolution`; nothing where none is recorded."""
    pixels = trained_resolution(meta)
    if pixels is not None and hasattr(pipe, "default_sample_size"):
        pipe.default_sample_size = pixels // pipe.vae_scale_factor


def source_metadata(source: str | Path, **hub_kwargs) -> dict:
    """The fastgen metadata of a pipeline folder or hub id (``fastgen.json`` through the hub cache, with
    ``hub_kwargs`` such as ``revision``); {} where there is none or the hub cannot be reached."""
    if (Path(source) / "model_index.json").is_file():
        return read_metadata(source)
    if HUB_ID.match(str(source)):
        try:
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(str(source), METADATA_FILE, **hub_kwargs)).read_text())
        except Exception:  # noqa: BLE001 -- offline or no such file: not a fastgen student as far as we can tell
            return {}
    return {}


def pipeline_metadata(pipe) -> dict:
    """The fastgen metadata of a loaded pipeline: its folder's or hub repo's (:func:`source_metadata`), else the
    legacy scheduler-config key; {} for other pipelines."""
    source = str(getattr(pipe, "name_or_path", None) or "")
    meta = source_metadata(source) if source else {}
    return meta or dict(dict(pipe.scheduler.config).get(LEGACY_METADATA_KEY) or {})


__all__ = ["export_student", "exported_scheduler", "read_metadata", "source_metadata", "pipeline_metadata",
           "trained_resolution", "use_trained_resolution", "unshifted_flow_scheduler",
           "pipeline_kwargs", "student_pipeline_class",
           "teacher_reference", "check_student_network", "call_arguments", "METADATA_FILE"]
