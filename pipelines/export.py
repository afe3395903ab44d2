"""Export a student as a plain diffusers folder: the teacher's built-in pipeline class with a
built-in scheduler that reproduces fastgen's sampler.

``DiffusionPipeline.from_pretrained(folder)`` loads the result with no extra arguments and
without fastgen installed:

* multistep students (DMD2, LCM, SiD) -> ``LCMScheduler`` whose ``set_timesteps(N)`` gives the
  trained timesteps (``original_inference_steps=N``); flow teachers ->
  ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``.
* DDIM students (progressive distillation) -> ``DDIMScheduler(timestep_spacing="trailing",
  set_alpha_to_one=True)``; flow teachers -> ``FlowMatchEulerDiscreteScheduler``.

fastgen's metadata (method, trained timesteps, recommended guidance) is kept as extra keys of
``scheduler/scheduler_config.json``, which diffusers preserves. Pipeline call defaults cannot be
set by config, so the folder's README.md states the exact call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from fastgen.denoiser import check_guidance_scale
from fastgen.schedule import check_timesteps

from .folders import writing_folder

METADATA_KEY = "fastgen"
# The config keys through which a pipeline talks to its denoising network: a student must agree with the
# teacher's network on each (the layers inside may differ), or the exported folder cannot run.
INTERFACE_KEYS = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "addition_embed_type",
                  "projection_class_embeddings_input_dim", "encoder_hid_dim", "patch_size",
                  "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")


def _set_timesteps(scheduler, n: int) -> list[int]:
    """The timesteps ``scheduler.set_timesteps(n)`` gives: what a pipeline called with N steps runs."""
    scheduler.set_timesteps(n)
    return [int(round(float(t))) for t in scheduler.timesteps]


def _lcm_grids(timesteps: list[int]) -> list[int]:
    """Candidate ``original_inference_steps`` of an LCMScheduler for these timesteps: ``N`` itself, then the grids
    of every skipping step ``k`` that all ``t + 1`` share (LCM's training grid is ``t = j k - 1``), coarsest first."""
    g = math.gcd(*(t + 1 for t in timesteps))
    return [len(timesteps)] + [(timesteps[0] + 1) // k for k in range(g, 0, -1) if g % k == 0]


def _built_in_scheduler(teacher_config: dict, timesteps: list[int], sampler: str, overrides: dict | None = None):
    """The diffusers scheduler that reproduces fastgen's sampler, and the timesteps its ``set_timesteps(N)`` gives.

    ``overrides``: config keys of the student's own (``prediction_type``, ``timestep_scaling``, ...)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

    config = {k: v for k, v in teacher_config.items() if not k.startswith("_") and k != METADATA_KEY}
    config.update(overrides or {})
    n = len(timesteps)
    T = config.get("num_train_timesteps", 1000)
    if teacher_config.get("_class_name", "").startswith("FlowMatch"):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, stochastic_sampling=(sampler == "multistep"))
    elif sampler == "multistep":
        scheduler = None
        preferred = [config.pop("original_inference_steps")] if "original_inference_steps" in config else []
        for original_steps in preferred + _lcm_grids(timesteps):  # the first schedule whose set_timesteps(N) gives them
            if not 0 < original_steps <= T:
                continue
            if timesteps[0] == T - 1:
                candidate = LCMScheduler.from_config(config, original_inference_steps=original_steps,
                                                     set_alpha_to_one=True)
            else:  # the cut schedule, where it reproduces them
                candidate = _truncated(LCMScheduler, config, timesteps[0] + 1, original_inference_steps=original_steps)
            if _set_timesteps(candidate, n) == timesteps:
                scheduler = candidate
                break
        scheduler = scheduler or LCMScheduler.from_config(config, original_inference_steps=n, set_alpha_to_one=True)
    elif sampler == "ddim":
        # DDIMScheduler steps from t to t - T'//N, so it reproduces the trailing grid t_i = (N - i) d - 1 of
        # T' = N d (its own for d = T // N when N divides T; with the betas cut at T' < T otherwise)
        d = timesteps[-1] + 1
        if timesteps != [(n - i) * d - 1 for i in range(n)] or n * d > T:
            raise ValueError(
                f"DDIMScheduler steps from t to t - T//N, so it reproduces only evenly spaced trailing timesteps "
                f"t_i = (N - i) d - 1 with N d <= T = {T} (the betas are cut at N d < T); got {timesteps}.")
        scheduler = (DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True) if n * d == T
                     else _truncated(DDIMScheduler, config, n * d, timestep_spacing="trailing"))
    else:
        raise ValueError(f"Unknown sampler {sampler!r}; expected 'multistep' or 'ddim'.")
    return scheduler, _set_timesteps(scheduler, n)


def _truncated(scheduler_class, config: dict, num_train_timesteps: int, **options):
    """A scheduler on the teacher's betas cut at ``num_train_timesteps`` < T.

    Pipelines without a ``timesteps`` argument (``DDPMPipeline``) only call ``set_timesteps(N)``, which
    always starts at ``T - 1``. Cutting the teacher's betas at ``t0 + 1`` keeps ``alphas_cumprod`` for
    every ``t <= t0`` unchanged, so ``set_timesteps(N)`` of the cut schedule starts at ``t0`` instead
    (and DDIM's step ``T // N`` becomes ``(t0 + 1) // N``).
    """
    from diffusers import DDPMScheduler

    betas = DDPMScheduler.from_config(config).betas[:num_train_timesteps]
    return scheduler_class.from_config(config, num_train_timesteps=num_train_timesteps, trained_betas=betas.tolist(),
                                       set_alpha_to_one=True, **options)


def exported_scheduler(pipe, timesteps: Sequence[int], sampler: str = "multistep", overrides: dict | None = None):
    """``(scheduler, custom)``: the built-in scheduler the export writes for these trained timesteps, and
    whether the pipeline must be called with ``timesteps=`` (``set_timesteps(N)`` gives others).

    Raises ``ValueError`` when that is needed but ``type(pipe).__call__`` has no ``timesteps`` argument
    (``DDPMPipeline``): such a student could not be reproduced from its folder.
    """
    import inspect

    config = dict(pipe.scheduler.config)
    ts = check_timesteps(timesteps, config.get("num_train_timesteps", 1000))
    scheduler, default = _built_in_scheduler(config, ts, sampler, overrides)
    custom = default != ts
    if custom and "timesteps" not in inspect.signature(type(pipe).__call__).parameters:
        raise ValueError(
            f"{type(pipe).__name__} cannot be called with custom timesteps, and {type(scheduler).__name__}'s "
            f"set_timesteps({len(ts)}) gives {default}, not {ts}. Train with student.num_steps "
            f"(fastgen.pipelines.sampler.student_timesteps), or with timesteps evenly spaced below t0 where "
            f"t0 + 1 is divisible by their number (the export then cuts the schedule at t0 + 1).")
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


def _model_card(pipe_class: str, scheduler_class: str, meta: dict, call: str, is_text: bool) -> str:
    example = 'pipe("a photo of a sneaker", ' if is_text else "pipe("
    return f"""---
library_name: diffusers
tags:
- fastgen
- distillation
- {meta['method']}
---

# {meta['num_steps']}-step {meta['method']} student of `{meta['teacher']}`

Distilled with [fastgen](https://pypi.org/project/fastgen/) (method: `{meta['method']}`). This is a plain
`{pipe_class}` with a `{scheduler_class}`; fastgen is not needed to run it.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")
image = {example}{call}, generator=torch.Generator().manual_seed(0)).images[0]
```

Pass these arguments exactly: pipeline call defaults cannot be changed by a config file, and the
student was trained for these timesteps ({meta['timesteps']}) and guidance scale
({meta['guidance_scale']}; guidance at or below 1 disables classifier-free guidance).

fastgen metadata (also in `scheduler/scheduler_config.json` under `"{METADATA_KEY}"`):

```json
{json.dumps(meta, indent=2)}
```
"""


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
    network_name = "unet" if "unet" in pipe.components else "transformer"
    teacher_config = dict(pipe.scheduler.config)
    timesteps = check_timesteps(timesteps, teacher_config.get("num_train_timesteps", 1000))
    scheduler, custom = exported_scheduler(pipe, timesteps, sampler, scheduler_config)
    is_text = hasattr(pipe, "encode_prompt")
    call = f"timesteps={timesteps}" if custom else f"num_inference_steps={len(timesteps)}"
    if is_text:
        call += f", guidance_scale={guidance_scale}"
    meta = {"method": method, "sampler": sampler, "num_steps": len(timesteps), "timesteps": timesteps,
            "guidance_scale": guidance_scale, "teacher": str(getattr(pipe, "name_or_path", "") or teacher_config.get(
                "_name_or_path", "teacher")), "call": call, **(extra_metadata or {})}
    scheduler.register_to_config(**{METADATA_KEY: meta})

    components = dict(pipe.components)
    if model is not None:
        if hasattr(model, "peft_config"):
            raise ValueError("The student still carries peft adapters; fuse them first with "
                             "fastgen.pipelines.lora.fuse_student(model).")
        check_student_network(pipe, network_name, model)
        components[network_name] = model
    components["scheduler"] = scheduler
    student = type(pipe)(**components)
    with writing_folder(out_dir, marker="model_index.json", what="Student folder") as tmp:
        student.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(type(pipe).__name__, type(scheduler).__name__, meta, call, is_text))
    return Path(out_dir)


def read_metadata(folder: str | Path) -> dict:
    """The fastgen metadata of an exported folder ({} for a folder fastgen did not write)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no scheduler/scheduler_config.json; is it a diffusers pipeline folder?")
    return json.loads(path.read_text()).get(METADATA_KEY, {})
