"""The interface every distillation method implements, and the pieces they all share.

A method is an ``nn.Module`` holding the teacher, the student and whatever else it trains (a
critic, a GAN head). The trainer (:mod:`fastgen.train.trainer`) knows nothing about the math; it
asks the method:

* :meth:`DistillationMethod.parameter_groups` -- the trained parameters, one optimizer per group
  (e.g. ``{"generator": ..., "critic": ...}``);
* :meth:`DistillationMethod.training_step` -- one iteration on a :class:`Batch`, returning the loss of
  every group to update *this* iteration (the method owns its update schedule, e.g. DMD2's
  critic-every-iteration, generator-every-``ratio``); calling the module runs it, so the trainer can
  wrap the method with accelerate (DDP) and run one forward and one backward per iteration;
* :meth:`DistillationMethod.sample` -- the student's own sampler;
* :meth:`DistillationMethod.export_info` -- what the exported scheduler must reproduce (sampler
  name and timesteps).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Iterable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from fastgen.denoiser import Conditioning, Denoiser
from fastgen.lora import DEFAULT_UNET_TARGETS, AdapterDenoiser, add_lora, base_copy, lora_parameters


@dataclass
class Batch:
    """One training batch; every field but ``size`` is optional.

    Args:
        size: number of student samples to generate.
        cond: conditioning of the prompts (``None`` for unconditional teachers).
        uncond: conditioning of the empty prompt, one row per sample (teacher guidance).
        real: real samples in the network's space (latents for latent models), for GAN losses.
        real_cond: the real samples' conditioning.
        pair_noise: noise of cached teacher ODE pairs (DMD's regression loss) ...
        pair_target: ... the teacher's deterministic sample from that noise ...
        pair_cond: ... and its conditioning.
    """

    size: int
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    real: torch.Tensor | None = None
    real_cond: Conditioning | None = None
    pair_noise: torch.Tensor | None = None
    pair_target: torch.Tensor | None = None
    pair_cond: Conditioning | None = None

    def to(self, device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if f.name != "size" and getattr(self, f.name) is not None})


@dataclass
class StepOutput:
    """The result of one training iteration.

    Args:
        losses: optimizer group -> scalar loss to minimise with that group's optimizer; only the
            groups updated this iteration appear. The losses of different groups have disjoint
            gradients, so the trainer backpropagates their sum once.
        logs: named loss terms (detached) for the progress bar and trackers.
    """

    losses: dict[str, torch.Tensor]
    logs: dict[str, torch.Tensor]


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]):
    """Temporarily stop gradients to ``params`` (gradients still flow *through* the network to its input)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_student(teacher: Denoiser, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets=DEFAULT_UNET_TARGETS, adapter_name: str = "student") -> Denoiser:
    """The student network, initialised from the teacher.

    ``lora_rank=0``: a full trainable copy of the teacher network. ``lora_rank > 0``: a LoRA adapter
    ``adapter_name`` on the teacher's own network (frozen base; the teacher runs with adapters disabled).
    """
    if lora_rank > 0:
        add_lora(teacher.model, adapter_name, rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
        return AdapterDenoiser(teacher.model, teacher.schedule, adapter_name)
    return Denoiser(base_copy(teacher.model), teacher.schedule)


def student_parameters(student: Denoiser) -> list[nn.Parameter]:
    """The trained parameters of a student from :func:`make_student`."""
    if isinstance(student, AdapterDenoiser) and student.adapter is not None:
        return lora_parameters(student.model, student.adapter)
    return list(student.model.parameters())


class DistillationMethod(nn.Module):
    """Base class of the methods: a teacher, a student, and the student's sampler.

    Args:
        teacher: the frozen teacher (an :class:`~fastgen.lora.AdapterDenoiser` with ``adapter=None``
            when the student or critic are adapters on its network).
        student: the student, from :func:`make_student`; its output is read as x0 through the
            teacher's parameterisation.
        timesteps: the student's descending network timesteps, e.g. ``[999]`` or ``[999, 749, 499, 249]``
            (:func:`fastgen.pipelines.sampler.student_timesteps` computes the exported scheduler's).
    """

    name = "base"
    sampler = "multistep"  # x0 then re-noise with fresh noise; exported as LCMScheduler

    def __init__(self, teacher: Denoiser, student: Denoiser, timesteps: Sequence[int]):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.schedule = teacher.schedule
        self.timesteps = [int(t) for t in timesteps]
        for name, p in teacher.model.named_parameters():  # the teacher is frozen; adapters on it may train
            if "lora_" not in name:
                p.requires_grad_(False)

    # --- the interface --------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trained parameters per optimizer group."""
        raise NotImplementedError

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        """One iteration (``step`` counts from 0): the losses of the groups to update now."""
        raise NotImplementedError

    def forward(self, batch: Batch, step: int) -> StepOutput:
        return self.training_step(batch, step)

    def export_info(self) -> dict:
        """What export needs: ``{"method", "sampler", "timesteps", "guidance_scale"}``."""
        return {"method": self.name, "sampler": self.sampler, "timesteps": list(self.timesteps),
                "guidance_scale": 0.0}

    @property
    def student_adapter(self) -> str | None:
        """The student's adapter name when it is a LoRA student (export fuses it), else ``None``."""
        return self.student.adapter if isinstance(self.student, AdapterDenoiser) else None

    # --- shared pieces --------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.student.model.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def student_x0(self, x_t: torch.Tensor, t, cond: Conditioning | None = None) -> torch.Tensor:
        """The student's output as x0, clipped like the exported scheduler when the teacher clips.

        The clip's gradient is taken as the identity (straight-through): an epsilon network read as x0
        at ``t = T - 1`` amplifies its errors by ``1 / sqrt(alpha_cumprod)`` (~150x for a linear DDPM
        schedule), so at initialisation nearly every pixel is clipped, and a plain ``clamp`` would give
        them no gradient at all.
        """
        x0 = self.student(x_t, t, cond).x0
        clip = self.schedule.clip_sample_range
        return x0 if clip is None else x0 + (x0.clamp(-clip, clip) - x0).detach()

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pure noise at ``timesteps[0]``: the generator's input."""
        param = next(self.student.model.parameters())
        return randn_tensor((n, *self.latent_shape), generator=generator, device=param.device, dtype=param.dtype)

    def simulate(self, noise: torch.Tensor, k: int, cond: Conditioning | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_{t_k}``: run the student through steps ``0 .. k-1`` from ``noise`` (x0, then re-noise with
        fresh noise to the next timestep). DMD2's backward simulation; ``k = 0`` returns ``noise``."""
        x = noise
        for i in range(k):
            x0 = self.student_x0(x, self.timesteps[i], cond)
            z = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x = self.schedule.add_noise(x0, z, self.timesteps[i + 1])
        return x

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The student's own sampler: x0-then-renoise over all its timesteps (what the export reproduces)."""
        last = len(self.timesteps) - 1
        return self.student_x0(self.simulate(noise, last, cond, generator), self.timesteps[last], cond)


__all__ = ["Batch", "StepOutput", "DistillationMethod", "frozen", "make_student", "student_parameters"]
