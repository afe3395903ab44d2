"""``FewStepPipeline``: an exported student folder as a diffusers pipeline whose defaults are the student's.

``FewStepPipeline.from_pretrained(folder)`` loads any folder fastgen exported (UNet and transformer students,
text-conditional or not) and reads its ``fastgen.json``: the call with no other argument then runs the
student's trained timesteps with its sampler and guidance, at its trained resolution -- fastgen's own sampler
(:mod:`fastgen.pipelines.sampler`), which the exported folder's built-in scheduler reproduces. Timesteps are the
network's: whole numbers in [0, T-1] for DDPM-family (VP) students, continuous ``t = sigma T`` in (0, T] for flow
students (SD3, Flux: floats such as ``[1000.0, 750.0]``). Beside the plain call it offers two hybrid modes that use
the teacher network at inference (pass ``teacher=``):

* ``teacher_steps=k`` -- the teacher takes the first k steps (its deterministic DDIM), the student the rest
  ("diversity distillation", Gandikota & Bau 2025: the base model sets the composition, the distilled one
  the details). A student whose first trained timestep t_s is below the top (T-1; flow: T, sigma 1) keeps all its
  steps and the teacher goes from the top down to t_s in k even steps; a student that starts at the top hands its
  first k steps to the teacher.
* ``teacher_refine=lambda`` -- teacher guidance at inference ("Distillation++", Park et al. 2024): the x0 the
  student predicts at each of its first ``refine_steps`` steps is moved toward the teacher's x0 (with the
  teacher's classifier-free guidance) at ``refine_timestep``, ``x0 <- x0 + lambda (x0_teacher - x0)``: the
  interpolation form of the paper's score-distillation update.

The plain export stays the contract: this class needs fastgen; ``save_pretrained`` writes the plain folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from fastgen.denoiser import Denoiser, check_guidance_scale
from fastgen.schedule import FlowSchedule, schedule_timesteps

from .export import METADATA_FILE, pipeline_kwargs, source_metadata, use_trained_resolution
from .generate import PipelineSampler, is_flux, network_denoiser, placement
from .sampler import SAMPLERS, check_gamma, sample_ddim, sample_tcd

COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
              "text_encoder_3", "tokenizer_3", "safety_checker", "feature_extractor", "teacher", "teacher_scheduler")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class FewStepPipeline(DiffusionPipeline):
    r"""A fastgen student with its own defaults: ``FewStepPipeline.from_pretrained(folder)(prompt)``.

    Components (each optional but ``scheduler``; a folder brings those its built-in pipeline has):
        scheduler: the folder's exported scheduler; it gives the timesteps of ``num_inference_steps=N`` calls.
        unet / transformer: the student network.
        vae, text_encoder(_2, _3), tokenizer(_2, _3), safety_checker, feature_extractor: as in the folder's
            built-in pipeline (``base_pipeline``), which encodes prompts, decodes latents and checks images.
        teacher: the teacher's network, for the hybrid modes (``from_pretrained(folder, teacher=...)`` or
            :meth:`load_teacher`).
        teacher_scheduler: the teacher's scheduler, whose noise schedule the teacher's steps use (default: the
            student's, which has the teacher's betas unless the export cut them below T).
    Config:
        base_pipeline: the built-in pipeline class of the folder (``StableDiffusionPipeline``, ...).
        base_config: that pipeline's config entries (``requires_safety_checker``, ...).
        student: the folder's ``fastgen.json`` (timesteps, sampler, guidance_scale, ...).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = list(COMPONENTS)

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, safety_checker=None,
                 feature_extractor=None, teacher=None, teacher_scheduler=None, base_pipeline: str = "",
                 base_config: dict | None = None, student: dict | None = None):
        super().__init__()
        if unet is None and transformer is None:
            raise ValueError("FewStepPipeline needs the student network: a `unet` or a `transformer`.")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
                              safety_checker=safety_checker, feature_extractor=feature_extractor, teacher=teacher,
                              teacher_scheduler=teacher_scheduler)
        self.register_to_config(base_pipeline=base_pipeline, base_config=dict(base_config or {}),
                                student=dict(student or {}))
        self._cache = (None, None)  # (component identities, (base pipeline, student sampler, teacher denoiser))

    # --- loading and saving -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "FewStepPipeline":
        """Load an exported student folder (or hub id) with its ``fastgen.json`` as the defaults.

        Args:
            pretrained_model_name_or_path: the folder (or hub id) fastgen exported.
            kwargs: as ``DiffusionPipeline.from_pretrained`` (``torch_dtype``, ``revision``, components such as
                ``teacher=``); ``student=`` gives the metadata of a folder fastgen did not write.
        Raises:
            ValueError: the folder has no fastgen metadata and ``student`` is not given.
        """
        source = str(pretrained_model_name_or_path)
        index = DiffusionPipeline.load_config(source, **{k: kwargs[k] for k in ("revision", "cache_dir",
                                                                                 "local_files_only") if k in kwargs})
        base = index.get("_class_name", "")
        if base == cls.__name__:
            raise ValueError(f"{source} was saved as a {cls.__name__}; FewStepPipeline loads exported student folders.")
        student = kwargs.pop("student", None) or source_metadata(source, **{k: kwargs[k] for k in ("revision",)
                                                                            if k in kwargs})
        if not student.get("timesteps"):
            raise ValueError(f"{source} has no fastgen metadata ({METADATA_FILE} with the student's timesteps): "
                             "pass student={'timesteps': [...], 'sampler': 'multistep', 'guidance_scale': 0.0}.")
        base_config = {k: v for k, v in index.items() if not k.startswith("_")
                       and not (isinstance(v, (list, tuple)) and len(v) == 2)}  # [library, class] is a component
        return super().from_pretrained(source, base_pipeline=base, base_config=base_config, student=student,
                                       **kwargs)

    def load_teacher(self, teacher) -> "FewStepPipeline":
        """Register the teacher for the hybrid modes: a pipeline, or its folder / zoo name / hub id (loaded).
        Returns ``self``."""
        if isinstance(teacher, (str, Path)):
            from .loading import load_pipeline

            teacher = load_pipeline(str(teacher), what="Teacher")
        network = teacher.components.get("unet")
        network = network if network is not None else teacher.components.get("transformer")
        self.register_modules(teacher=network.to(self.device), teacher_scheduler=teacher.scheduler)
        return self

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the plain folder: the built-in pipeline (no teacher) and ``fastgen.json``."""
        import json

        from .portable import make_portable

        base = self._parts()[0]
        base.save_pretrained(save_directory, **kwargs)
        make_portable(base, save_directory)
        (Path(save_directory) / METADATA_FILE).write_text(json.dumps(self.config.student, indent=2) + "\n")

    def _parts(self):
        """``(base, sampler, teacher)``: the folder's built-in pipeline over this pipeline's components (prompt
        encoding, guidance embedding, VAE and safety checker are its), fastgen's sampler of the student over it,
        and the teacher's :class:`~fastgen.denoiser.Denoiser` (``None`` without a teacher). Built once and again
        only when a component is replaced (schedules are computed from scheduler configs: not per call)."""
        import diffusers

        components = {name: getattr(self, name, None) for name in ("scheduler", *COMPONENTS)}
        key = tuple(id(c) for c in components.values())
        if self._cache[0] != key:
            cls = getattr(diffusers, self.config.base_pipeline)
            own = {k: v for k, v in components.items() if k not in ("teacher", "teacher_scheduler")}
            base = cls(**pipeline_kwargs(cls, own, dict(self.config.base_config)))
            use_trained_resolution(base, self.config.student)  # Flux's call defaults to 128 latents otherwise
            base.set_progress_bar_config(disable=True)
            sampler = PipelineSampler(base, self.unet if self.unet is not None else self.transformer)
            teacher = None
            cut = self.scheduler.config.get("trained_betas") is not None  # the export cut the betas below t0 + 1
            if self.teacher is not None and (self.teacher_scheduler is not None or not cut):
                scheduler = self.teacher_scheduler if self.teacher_scheduler is not None else self.scheduler
                teacher = network_denoiser(self.teacher, scheduler.config, getattr(base, "default_sample_size", None))
            self._cache = (key, (base, sampler, teacher))
        return self._cache[1]

    # --- sampling ---------------------------------------------------------------------------------------------
    def _student_timesteps(self, num_inference_steps, timesteps, schedule) -> list:
        """The student's timesteps: ``timesteps`` checked for ``schedule`` (floats for flow), the trained ones, or
        those the plain pipeline runs for ``num_inference_steps``."""
        if timesteps is not None:
            return schedule_timesteps(schedule, timesteps)
        if num_inference_steps is None or num_inference_steps == len(self.config.student["timesteps"]):
            return list(self.config.student["timesteps"])
        if isinstance(schedule, FlowSchedule):  # FluxPipeline passes the sigmas 1, ..., 1/N; SD3's call none
            n = num_inference_steps
            self.scheduler.set_timesteps(n, sigmas=[1 - i / n for i in range(n)] if is_flux(self.transformer) else None)
            return [float(t) for t in self.scheduler.timesteps.double()]
        self.scheduler.set_timesteps(num_inference_steps)  # what the plain pipeline runs for N steps
        return [int(round(float(t))) for t in self.scheduler.timesteps]

    def _teacher_part(self, student_ts: list, teacher_steps: int, schedule) -> tuple[list, list]:
        """``(teacher timesteps, student timesteps)`` of a hybrid run (see the module docstring); flow schedules
        (continuous time) split the span above the student evenly in t = sigma T."""
        if teacher_steps < 1:
            return [], student_ts
        flow = isinstance(schedule, FlowSchedule)
        top = schedule.num_train_timesteps if flow else schedule.num_train_timesteps - 1
        if student_ts[0] < top:
            span = top - student_ts[0]
            if flow:
                return [top - i * span / teacher_steps for i in range(teacher_steps)], student_ts
            if teacher_steps > span:
                raise ValueError(f"teacher_steps={teacher_steps}: only {span} timesteps lie above the student's "
                                 f"first ({student_ts[0]}).")
            return [top - (i * span) // teacher_steps for i in range(teacher_steps)], student_ts
        if teacher_steps >= len(student_ts):
            raise ValueError(f"teacher_steps={teacher_steps} must leave the {len(student_ts)}-step student at least "
                             "one of its steps (it starts at T-1).")
        return student_ts[:teacher_steps], student_ts[teacher_steps:]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int | None = None,
                 timesteps: list[float] | None = None, guidance_scale: float | None = None, negative_prompt: str = "",
                 num_images_per_prompt: int = 1, batch_size: int = 1, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 teacher_steps: int = 0, teacher_guidance_scale: float | None = None, teacher_refine: float = 0.0,
                 refine_steps: int = 1, refine_timestep: float | None = None, gamma: float | None = None):
        """Generate images with the student's trained call unless told otherwise.

        Args:
            prompt: a prompt or a list (text-conditional students); unconditional ones take ``batch_size``.
            num_inference_steps: N steps as the exported scheduler spreads them (default: the trained N, whose
                timesteps are the trained ones).
            timesteps: explicit student timesteps (instead of N): whole numbers in [0, T-1] (VP), or for flow
                students continuous ``t = sigma T`` in (0, T], e.g. ``[1000.0, 662.7]``.
            guidance_scale: the student's classifier-free guidance (default: the trained one; <= 1: none).
            negative_prompt: the prompt guidance pushes away from.
            num_images_per_prompt: images per prompt.
            batch_size: images of an unconditional student.
            generator: the torch generator; the same seed gives the plain folder's images.
            latents: the starting noise (default: drawn from ``generator``).
            output_type: ``"pil"``, ``"np"`` (``[B, H, W, C]`` in [0, 1]), ``"pt"`` (``[B, C, H, W]`` in [0, 1])
                or ``"latent"`` (the final latents, not decoded).
            return_dict: return an ``ImagePipelineOutput`` (else a one-element tuple).
            teacher_steps: hybrid: the teacher's DDIM steps before the student's (see the module docstring).
            teacher_guidance_scale: the teacher's guidance in both hybrid modes (default: the guidance the student
                was distilled with, ``teacher_guidance`` of its metadata, else none).
            teacher_refine: hybrid: lambda of the teacher's refinement of the student's x0 (0: off, 1: the
                teacher's x0).
            refine_steps: how many of the student's first steps are refined.
            refine_timestep: where the teacher evaluates the student's x0 (re-noised with the student's own noise
                estimate); default: each step's own timestep.
            gamma: sample with TCD's strategic stochastic sampling at this gamma in [0, 1] instead of the student's
                own sampler (:func:`~fastgen.pipelines.sampler.sample_tcd`; the plain folder with
                ``pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)`` and ``eta=gamma`` gives the same
                images). An inference option of consistency students; not with ``teacher_refine``.
        """
        student = self.config.student
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}.")
        guidance = student.get("guidance_scale") if guidance_scale is None else guidance_scale
        check_guidance_scale(guidance)
        base, sampler, teacher = self._parts()
        ts = self._student_timesteps(num_inference_steps, timesteps, sampler.denoiser.schedule)
        hybrid = teacher_steps > 0 or teacher_refine > 0
        if gamma is not None:
            check_gamma(gamma)
            if teacher_refine > 0:
                raise ValueError("gamma (TCD sampling) and teacher_refine do not combine: give one of them.")
        w_teacher = student.get("teacher_guidance") if teacher_guidance_scale is None else teacher_guidance_scale
        w_teacher = w_teacher if w_teacher is not None and w_teacher > 1 else None
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
            n = len(prompts)
        else:
            prompts, n = None, batch_size * num_images_per_prompt
        device, dtype = self._placement(sampler.denoiser.model)
        cond, uncond, w = sampler.conditioning(prompts, guidance, negative_prompt,
                                               need_uncond=hybrid and w_teacher is not None, device=device)
        x = latents if latents is not None else randn_tensor((n, *sampler.latent_shape), generator=generator,
                                                             device=device, dtype=dtype)
        refine = None
        if hybrid:
            if teacher is None and self.teacher is not None:
                raise ValueError("The export cut the student's schedule below its first timestep, so the teacher "
                                 "needs its own: pass teacher_scheduler= too, or use load_teacher().")
            if teacher is None:
                raise ValueError("The hybrid modes need the teacher: FewStepPipeline.from_pretrained(folder, "
                                 "teacher=network) or pipe.load_teacher(teacher_pipeline_or_folder).")
            t_cond = dataclasses.replace(cond, timestep_cond=None) if cond is not None else None
            teacher_ts, ts = self._teacher_part(ts, teacher_steps, teacher.schedule)
            if teacher_ts:
                x = sample_ddim(teacher, x, teacher_ts, t_cond, uncond, w_teacher, stop_at=ts[0])
            if teacher_refine > 0:
                refine = self._refinement(teacher, t_cond, uncond, w_teacher, sampler.denoiser, teacher_refine,
                                          refine_steps, refine_timestep)
        if gamma is not None:
            x = sample_tcd(sampler.denoiser, x, ts, cond, uncond, w, generator, gamma=gamma)
        else:
            kwargs = {"refine": refine} if refine is not None else {}
            x = SAMPLERS[student.get("sampler", "multistep")](sampler.denoiser, x, ts, cond, uncond, w, generator,
                                                              False, **kwargs)
        images = x if output_type == "latent" else self._postprocess(base, sampler, x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _placement(self, model) -> tuple[torch.device, torch.dtype]:
        """The execution device and dtype: the student's parameters', or with offloading hooks diffusers' own
        ``_execution_device`` (which walks every submodule: not per call otherwise)."""
        device, dtype = placement(model)
        if getattr(model, "_hf_hook", None) is not None or getattr(model, "_diffusers_hook", None) is not None:
            device = self._execution_device
        return device, dtype

    @staticmethod
    def _refinement(teacher: Denoiser, cond, uncond, w, student: Denoiser, strength: float, steps: int,
                    timestep: float | None):
        """The ``refine`` hook of the student's sampler: Distillation++'s move of x0 toward the teacher's."""
        if not 0 < strength <= 1:
            raise ValueError(f"teacher_refine must lie in (0, 1], got {strength}.")

        def refine(i, t, x_t, x0):
            if i >= steps:
                return x0
            at = t if timestep is None else timestep
            alpha, sigma = student.schedule.alpha_sigma(t)
            eps = (x_t - alpha.to(x_t) * x0) / sigma.to(x_t)
            x_at = teacher.schedule.add_noise(x0, eps, at)
            x0_teacher = teacher(x_at, at, cond, uncond, w).x0
            return x0 + strength * (x0_teacher - x0)

        return refine

    def _postprocess(self, base, sampler: PipelineSampler, latents: torch.Tensor, output_type: str):
        """Latents to images in the pipeline's output type, through the safety checker when the folder has one."""
        images = sampler.decode(latents)
        if getattr(base, "safety_checker", None) is not None:
            images, has_nsfw = base.run_safety_checker(images * 2 - 1, latents.device, latents.dtype)
            images = (images / 2 + 0.5).clamp(0, 1)
            self.nsfw_content_detected = has_nsfw
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return images if output_type == "np" else self.numpy_to_pil(images)


__all__ = ["FewStepPipeline"]
