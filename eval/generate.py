"""Generate evaluation images through the plain diffusers pipeline call.

Evaluation goes through ``pipe(...)`` itself -- the path users run -- with the scheduler swapped
for a training-free solver when benchmarking a teacher. Exported students are called as their
model card says (``num_inference_steps`` / ``timesteps`` and ``guidance_scale`` from the fastgen
metadata), which the export tests show equals fastgen's own sampler.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
import torch
from tqdm.auto import tqdm

from fastgen import zoo
from fastgen.pipelines.loading import load_pipeline  # noqa: F401  (re-exported for eval's users)
from fastgen.pipelines.prompts import prompt_options
from fastgen.schedule import is_flow_config

# Training-free solvers of the quality-vs-NFE frontier. Trailing spacing for all: "leading"
# spacing starts at t = 1 for one step and would make the low-NFE baselines meaninglessly bad.
SOLVERS = {
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "timestep_spacing": "trailing"}),
    "unipc": ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
}


# The same solvers on flow-matching teachers (SD3, Flux, fmnist-flow), with diffusers' flow sigmas. DDIM on a
# rectified flow (x0 and noise moved to the next sigma) is its Euler step: both are FlowMatchEulerDiscreteScheduler.
FLOW_SOLVERS = {
    "ddim": ("FlowMatchEulerDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def default_solvers(base_config) -> list[str]:
    """The solvers of a teacher's frontier: all four, or for a flow teacher all but ``ddim`` (its Euler)."""
    return [name for name in SOLVERS if not (is_flow_config(base_config) and name == "ddim")]


def solver_scheduler(name: str, base_config):
    """A diffusers scheduler for solver ``name`` on the teacher's noise schedule (flow teachers: its flow sigmas,
    with the teacher's shift)."""
    import diffusers

    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; available: {', '.join(SOLVERS)}.")
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_") and k != "fastgen"}
    if not is_flow_config(config):
        cls_name, options = SOLVERS[name]
        return getattr(diffusers, cls_name).from_config(config, **options)
    cls_name, options = FLOW_SOLVERS[name]
    cls = getattr(diffusers, cls_name)
    if cls_name.startswith("FlowMatch"):
        return cls.from_config(config, **options)
    accepted = set(inspect.signature(cls.__init__).parameters)  # the flow config's keys this solver also takes
    return cls.from_config({k: v for k, v in config.items() if k in accepted and k != "shift"}, **options,
                           flow_shift=config.get("shift", 1.0))


def tcd_scheduler(scheduler):
    """diffusers' ``TCDScheduler`` on a pipeline scheduler's config (a consistency student's ``LCMScheduler`` keeps
    its ``original_inference_steps`` grid, so ``N`` steps run the same timesteps); a ``ValueError`` for flow ones."""
    from diffusers import TCDScheduler

    from fastgen.schedule import VPSchedule, schedule_from_scheduler_config

    config = {"_class_name": type(scheduler).__name__, **{k: v for k, v in dict(scheduler.config).items()
                                                           if k != "fastgen"}}
    if not isinstance(schedule_from_scheduler_config(config), VPSchedule):
        raise ValueError(f"--gamma: TCDScheduler needs a DDPM-family (VP) scheduler, not {type(scheduler).__name__}.")
    return TCDScheduler.from_config(config)


def timesteps_scheduler(scheduler, solver: str | None = None):
    """The scheduler that runs a pipeline on explicit timesteps: ``scheduler`` itself (or ``solver``'s) when its
    ``set_timesteps`` takes them. DDIM -- the zoo teachers' own ``DDIMScheduler``, or ``solver="ddim"`` -- takes
    none, so it is run as first-order DPM-Solver++, which is DDIM on any timesteps (Lu et al. 2022; the last
    step returns x0, as fastgen's ``sample_ddim``: tested). Flow schedulers (SD3, Flux: their calls take
    ``sigmas``, :func:`generate` passes ``t / T``) run them with their own Euler scheduler unshifted, so that the
    given timesteps are the ones run (an exported student's already is). A ``ValueError`` names the solvers that
    take them."""
    import diffusers

    from fastgen.pipelines.export import unshifted_flow_scheduler

    current = type(scheduler).__name__
    if is_flow_config({"_class_name": current, **dict(scheduler.config)}) or scheduler.config.get("use_flow_sigmas"):
        if solver not in (None, "ddim", "euler"):
            raise ValueError(f"--timesteps: a flow pipeline runs explicit timesteps (as sigmas = t / T) with its "
                             f"Euler scheduler; give --solver euler (or none), or --steps with {solver}.")
        return unshifted_flow_scheduler(dict(scheduler.config))
    if solver is not None:
        scheduler = solver_scheduler(solver, scheduler.config)
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        return scheduler
    if solver in (None, "ddim") and type(scheduler).__name__ == "DDIMScheduler":
        config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_") and k != "fastgen"}
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=1,
                                                                final_sigmas_type="zero")
    takes = [name for name in SOLVERS if name == "ddim" or "timesteps" in inspect.signature(
        getattr(diffusers, SOLVERS[name][0]).set_timesteps).parameters]
    raise ValueError(f"--timesteps: {'solver ' + repr(solver) if solver else current} takes no explicit timesteps; "
                     f"use --steps, or a --solver that does: {', '.join(takes)}.")


def check_generation(num_images: int, steps: int | None = None, timesteps=None, guidance: float | None = None,
                     batch_size: int = 100, flow: bool | None = None) -> None:
    """One-line ``ValueError`` for a generation request that cannot run, before anything is loaded. ``flow``:
    whether the pipeline is a flow one (timesteps ``t = sigma T`` in (0, T], any numbers), a VP one (whole numbers
    from 0), or unknown (``None``: either kind is accepted here; the pipeline's own is checked once loaded)."""
    from fastgen.denoiser import check_guidance_scale
    from fastgen.schedule import check_timesteps

    for name, value in (("--num-images", num_images), ("--batch-size", batch_size), ("--steps", steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if timesteps:
        errors = []
        for continuous in ((False, True) if flow is None else (flow,)):
            try:
                check_timesteps(timesteps, continuous=continuous)
                break
            except ValueError as err:
                errors.append(err)
        else:
            raise ValueError(f"--timesteps {list(timesteps)}: {errors[0]}") from None
    check_guidance_scale(guidance, "--guidance")


def zoo_name_of(pipe, name_or_path: str) -> str | None:
    """The zoo teacher a pipeline is (or was distilled from), for picking the domain classifier."""
    found = zoo.name_of(name_or_path)
    if found:
        return found
    from fastgen.pipelines.export import pipeline_metadata

    teacher = str(pipeline_metadata(pipe).get("teacher", ""))
    # a student exported elsewhere records the teacher's folder on that machine: match its last part too
    return zoo.name_of(teacher) or next((n for n in zoo.names() if teacher.rstrip("/").endswith(n)), None)


def unconditional_call(pipe, batch_size: int, num_inference_steps: int | None, generator: torch.Generator,
                       timesteps: list[int] | None = None, eta: float | None = None) -> torch.Tensor:
    """``DDPMPipeline.__call__`` for any scheduler; images ``[B, C, H, W]`` in [0, 1].

    ``DDPMPipeline`` passes ``generator`` to every ``scheduler.step`` (UniPC's does not accept it) and
    never calls ``scale_model_input`` (Euler needs it), so it runs only DDPM-like schedulers. This is
    its loop with the two checks diffusers' other pipelines make; for DDPM, DDIM and LCM schedulers it
    gives exactly the pipeline's images (tested), and with ``timesteps`` (a scheduler that takes them) those
    of ``ConsistencyModelPipeline``, the class of exported unconditional students. ``eta``: passed to every
    ``scheduler.step`` (DDIM's eta as ``DDIMPipeline`` passes it, or a ``TCDScheduler``'s gamma, which
    ``ConsistencyModelPipeline`` leaves at the default 0.3).
    """
    from diffusers.utils.torch_utils import randn_tensor

    unet, scheduler = pipe.unet, pipe.scheduler
    shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    image = randn_tensor(shape, generator=generator, device=pipe.device, dtype=unet.dtype) * scheduler.init_noise_sigma
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(num_inference_steps)
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if "generator" in step_params else {}
    if eta is not None:
        if "eta" not in step_params:
            raise ValueError(f"{type(scheduler).__name__}.step takes no eta (DDIM's or TCD's stochasticity).")
        step_kwargs["eta"] = eta
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(image, t), t).sample
        image = scheduler.step(model_output, t, image, **step_kwargs).prev_sample
    return (image / 2 + 0.5).clamp(0, 1)


@dataclass
class Generated:
    """Images in [0, 1] with what made them and how long it took (``batch_seconds``: each pipeline call)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    prompts: list[str] | None
    seconds: float
    nfe: int
    call: dict = field(default_factory=dict)
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)

    def timed(self) -> tuple[int, float]:
        """``(images, seconds)`` for speed figures: every call but the first (the warm-up: lazy initialisation,
        allocator and kernel caches), or the one call there is."""
        if len(self.batch_seconds) < 2:
            return len(self.images), self.seconds
        return sum(self.batch_sizes[1:]), sum(self.batch_seconds[1:])


def generate(pipe, num_images: int, num_inference_steps: int | None = None, timesteps: list | None = None,
             guidance_scale: float | None = None, prompts: list[str] | None = None, batch_size: int = 100,
             seed: int = 0, progress: bool = True, eta: float | None = None) -> Generated:
    """Generate ``num_images`` images with the pipeline's own ``__call__``.

    Args:
        pipe: a loaded diffusers pipeline (teacher with any scheduler, or an exported student).
        num_images: how many images.
        num_inference_steps / timesteps: the step count or explicit timesteps (one of them). SD3 and Flux calls
            take no timesteps: they are passed as ``sigmas = t / T`` (flow timesteps ``t = sigma T``; run as given
            by an unshifted scheduler, :func:`timesteps_scheduler`).
        guidance_scale: classifier-free guidance (text pipelines; ``<= 1`` disables it).
        prompts: prompts to cycle through; default for text pipelines: the zoo's class prompts, so
            image ``i`` shows class ``i % 10`` (its label).
        batch_size: images per pipeline call.
        seed: seed of ``torch.Generator`` (one generator for the whole run).
        eta: the scheduler's ``eta`` in the call (DDIM's stochasticity, or a ``TCDScheduler``'s gamma); default:
            the pipeline's own.
    Returns:
        :class:`Generated`; ``nfe`` counts network evaluations per image (a CFG pair counts once).
    """
    flow = is_flow_config({"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)})
    check_generation(num_images, num_inference_steps, timesteps, guidance_scale, batch_size, flow)
    text = hasattr(pipe, "encode_prompt")
    params = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict = {}
    if timesteps:
        if text and "timesteps" not in params and "sigmas" in params and flow:  # SD3, Flux
            kwargs["sigmas"] = [float(t) / pipe.scheduler.config.num_train_timesteps for t in timesteps]
        elif text and "timesteps" not in params:
            raise ValueError(f"{type(pipe).__name__} cannot be called with explicit timesteps; use --steps.")
        else:  # unconditional pipelines: unconditional_call sets them on the scheduler
            kwargs["timesteps"] = list(timesteps)
        nfe = len(timesteps)
    else:
        if not num_inference_steps or num_inference_steps < 1:
            raise ValueError("Give a positive number of steps or explicit timesteps.")
        kwargs["num_inference_steps"] = num_inference_steps
        nfe = num_inference_steps
    if eta is not None:  # unconditional pipelines: unconditional_call passes it to every step (recorded here)
        if text and "eta" not in params:
            raise ValueError(f"{type(pipe).__name__} cannot be called with eta (DDIM's or TCD's stochasticity).")
        kwargs["eta"] = eta
    labels = None
    if text:
        if prompts is None:
            prompts = zoo.prompts()
            labels = torch.arange(num_images) % len(prompts)
        all_prompts = [prompts[i % len(prompts)] for i in range(num_images)]
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        kwargs.update(prompt_options(pipe))  # e.g. fmnist-flow's max_sequence_length=0
    generator = torch.Generator().manual_seed(seed)
    chunks, batch_seconds, batch_sizes = [], [], []
    start = time.perf_counter()
    for lo in tqdm(range(0, num_images, batch_size), desc="generating", disable=not progress, leave=False):
        n = min(batch_size, num_images - lo)
        tick = time.perf_counter()
        with torch.no_grad():
            if text:
                out = pipe(prompt=all_prompts[lo:lo + n], generator=generator, output_type="np", **kwargs).images
                chunks.append(torch.from_numpy(out).permute(0, 3, 1, 2).float())
            else:
                chunks.append(unconditional_call(pipe, n, kwargs.get("num_inference_steps"), generator,
                                                 kwargs.get("timesteps"), eta).float().cpu())
        batch_seconds.append(time.perf_counter() - tick)
        batch_sizes.append(n)
    seconds = time.perf_counter() - start
    return Generated(torch.cat(chunks), labels, all_prompts if text else None, seconds, nfe, kwargs, batch_seconds,
                     batch_sizes)
