"""Consistency distillation (Song et al. 2023), latent consistency models (Luo et al. 2023) and LCM-LoRA.

A consistency model maps any point of the teacher's probability-flow ODE trajectory to its end:
``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_student(x_t, t)``, with the boundary condition ``f(x, 0) = x`` built in
(LCM's scalings with timestep scaling ``s``: ``c_skip = 0.25 / ((s t)^2 + 0.25)``, ``c_out = s t / sqrt((s t)^2 +
0.25)``, exactly as diffusers' ``LCMScheduler`` applies them). Per sample, with real data ``x``, a point ``t_{n+k}`` of
the grid ``t = j k - 1`` (skipping step ``k``) and ``t_n = t_{n+k} - k``:

    x_{t_{n+k}} = a x + s eps;   x^_{t_n} = solver_teacher(x_{t_{n+k}}, t_{n+k} -> t_n)    (CFG on x0 and eps)
    L = d( f_theta(x_{t_{n+k}}, t_{n+k}),  sg(f_target(x^_{t_n}, t_n)) )                  (L2 or pseudo-Huber)

The teacher's solver is a DDIM step (LCM) or Heun's second-order step (``solver = "heun"``, Song et al.; two
teacher calls). The target network is an EMA of the student (decay ``target_decay``, checkpointed; updated after
every step), or the student itself without gradient (``target_decay = 0``, LCM-LoRA). Sampling is multistep
consistency sampling -- ``f``, then re-noise with fresh noise to the next timestep -- which ``LCMScheduler`` runs:
the exported folder is the teacher's pipeline with an ``LCMScheduler`` whose ``set_timesteps(N)`` gives the
trained grid's timesteps; diffusers' ``TCDScheduler`` samples it too (``gamma``, see
:func:`fastgen.pipelines.sampler.sample_tcd`).

* ``cd`` -- consistency distillation of any VP or flow teacher, its CFG fixed (``guidance_scale``) where it has one.
  Flow teachers (SD3, Flux): ``f = x0 = x_t - sigma v`` (the boundary condition holds by itself), the grid is the
  teacher's own ``T // k``-step shifted Euler grid (:func:`teacher_steps`), and the student is exported with
  ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` called with ``sigmas=``.
* ``lcm`` -- LCM: a guidance-conditioned student (:mod:`fastgen.guidance_embedding`) told ``w ~ U[guidance_min,
  guidance_max]``, drawn per sample; exported so that ``pipe(prompt, num_inference_steps=4, guidance_scale=W)`` is
  the call. LCM-LoRA: ``student.lora_rank > 0``, ``lcm.guidance_embedding = false``, ``lcm.target_decay = 0``; its
  adapter file loads into the teacher's own pipeline (``pipe.load_lora_weights`` + ``LCMScheduler``).

The math is in shared/METHODS.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from fastgen.denoiser import Conditioning, Denoiser, check_guidance_scale
from fastgen.guidance_embedding import check_guidance_network

from .base import (Batch, DataNeeds, DistillationMethod, ExportSpec, OptimizerOptions, StepOutput, StudentOptions,
                   check_choice, make_student, option, register, student_parameters)
from fastgen.schedule import FlowSchedule

from .common import consistency_function, ddim_step, heun_step
from .guidance import DistilledGuidance, GuidanceRangeOptions

LOSSES = ("l2", "huber")
SOLVERS = {"ddim": ddim_step, "heun": heun_step}  # the teacher's ODE step from t_{n+k} to t_n


def consistency_grid(num_train_timesteps: int, skip: int) -> list[int]:
    """The grid ``t = j k - 1`` (``j = 1 .. T // k``) of skipping step ``k`` (LCM: 50 points ``19, 39, ..., 999``)."""
    return [j * skip - 1 for j in range(1, num_train_timesteps // skip + 1)]


def teacher_steps(schedule, skip: int) -> tuple[list, list]:
    """``(t_{n+k}, t_n)``: the grid points a consistency method trains at and the timestep the teacher's ODE step
    from each ends at. VP: ``t = j k - 1`` and ``max(t - k, 0)``. Flow: the ``M = T // k`` sigmas ``shift(j / M)``
    (``j = 1 .. M``, shifted as the teacher's scheduler shifts them) times T, each stepping to the one below (0 last):
    the teacher's own M-step Euler grid."""
    T = schedule.num_train_timesteps
    if isinstance(schedule, FlowSchedule):
        m = T // skip
        points = [float(schedule.shift_sigma(j / m)) * T for j in range(m + 1)]
        return points[1:], points[:-1]
    grid = consistency_grid(T, skip)
    return grid, [max(t - skip, 0) for t in grid]


def check_skip(name: str, skip: int, num_train_timesteps: int, num_steps: int) -> None:
    """A one-line ``ValueError`` unless the grid of skipping step ``skip`` has room for ``num_steps`` (and 2) points and
    is the one ``LCMScheduler(original_inference_steps = T // skip)`` samples on (``skip`` divides ``T``)."""
    T, need = num_train_timesteps, max(2, num_steps)
    if skip > T // need:
        raise ValueError(f"{name}.skip = {skip} is larger than the grid allows: T = {T} teacher timesteps give T // skip "
                         f"= {T // skip} grid points, fewer than {need} (student.num_steps, and at least 2); use "
                         f"skip <= {T // need} (LCM: 20).")
    if T % skip:
        raise ValueError(f"{name}.skip = {skip} must divide the teacher's T = {T} timesteps, so that LCMScheduler's grid "
                         f"(original_inference_steps = T // skip) is the trained one; e.g. 20, 25, 40 or 50.")


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """The pseudo-Huber distance ``mean(sqrt((a - b)^2 + c^2) - c)`` (Song & Dhariwal 2023; LCM's ``huber``)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c).mean()


@dataclass
class ConsistencyOptions:
    """Consistency distillation. Recipe: ``[cd]``."""

    skip: int = option(20, "skipping step k, in teacher timesteps: the grid is t = j k - 1 and the teacher steps from t "
                           "to t - k (LCM: 20 of 1000, a 50-step DDIM grid); must divide T")
    timestep_scaling: float = option(10.0, "s of the boundary condition c_skip = 0.25 / ((s t)^2 + 0.25) (LCM: 10; "
                                           "the exported LCMScheduler's timestep_scaling)")
    solver: str = option("ddim", "the teacher's ODE step from t_{n+k} to t_n: 'ddim' (one network call; LCM) or "
                                 "'heun' (Heun's 2nd-order method, two calls; Song et al. 2023)")
    loss: str = option("l2", "distance d: 'l2' (mean squared error) or 'huber' (pseudo-Huber with huber_c)")
    huber_c: float = option(0.001, "c of the pseudo-Huber loss (LCM: 0.001)")
    target_decay: float = option(0.95, "EMA decay of the target network per step (Song et al., LCM: 0.95); 0: the "
                                        "student itself without gradient, no target network (LCM-LoRA)")
    guidance_scale: float | None = option(None, "cd: the teacher's fixed CFG scale; default: the teacher's "
                                                "recommended one (fastgen.zoo.RECOMMENDED_GUIDANCE), else none")

    def validate(self) -> None:
        if self.skip < 1:
            raise ValueError(f"skip must be >= 1, got {self.skip}.")
        if not (math.isfinite(self.timestep_scaling) and self.timestep_scaling > 0):
            raise ValueError(f"timestep_scaling must be > 0, got {self.timestep_scaling}.")
        check_choice("solver", self.solver, SOLVERS)
        check_choice("loss", self.loss, LOSSES)
        if not self.huber_c > 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}.")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"target_decay must be in [0, 1), got {self.target_decay}.")
        check_guidance_scale(self.guidance_scale)


@register
class ConsistencyDistillation(DistillationMethod):
    """Consistency distillation (Song et al. 2023): DDIM or Heun teacher step, EMA target network, any VP teacher.

    LCM's boundary scalings. Arguments as :class:`~fastgen.methods.base.DistillationMethod`, with
    :class:`ConsistencyOptions`.
    """

    name = "cd"
    Options = ConsistencyOptions
    # Adam (0.9, 0.999), weight decay 0.01, lr 1e-4 after 500 warm-up steps (LCM's reference script; recipes
    # add train.max_grad_norm = 1, its clipping)
    optimizer_defaults = {"generator": OptimizerOptions(lr=1e-4, weight_decay=0.01, warmup_steps=500)}

    @classmethod
    def check_recipe(cls, options, student: StudentOptions) -> None:
        if student.lora_rank and options.target_decay:
            raise ValueError(f"a LoRA student trains without a target network (LCM-LoRA): set {cls.name}.target_decay = "
                             "0, or student.lora_rank = 0.")

    @classmethod
    def recipe_timesteps(cls, num_train_timesteps: int, options, student: StudentOptions):
        """Without ``student.timesteps``: the N timesteps ``LCMScheduler(original_inference_steps = T // skip)`` picks
        from the grid (``[999, 759, 499, 259]`` for N = 4, skip 20), so ``pipe(num_inference_steps=N)`` runs them."""
        from diffusers import LCMScheduler

        check_skip(cls.name, options.skip, num_train_timesteps, student.num_steps)
        if student.timesteps:
            return None
        scheduler = LCMScheduler(num_train_timesteps=num_train_timesteps,
                                 original_inference_steps=num_train_timesteps // options.skip)
        scheduler.set_timesteps(student.num_steps)
        return [int(t) for t in scheduler.timesteps]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        T = self.schedule.num_train_timesteps
        check_skip(self.name, o.skip, T, len(self.timesteps))
        self.grid, self.grid_prev = teacher_steps(self.schedule, o.skip)
        self.guidance = self.make_guidance()
        # the target network: an EMA of the student (not trained; updated in end_step), or none
        self.target = None
        if o.target_decay > 0:
            self.target = Denoiser(copy.deepcopy(self.student.model).requires_grad_(False), self.student.schedule)

    # --- the networks -------------------------------------------------------------------------
    def make_guidance(self):
        """The teacher's fixed CFG scale (``None``: none)."""
        w = self.options.guidance_scale if self.options.guidance_scale is not None else self.default_guidance
        if w is not None and not self.teacher.is_conditional:
            raise ValueError(f"{self.name}.guidance_scale = {w}, but the teacher is unconditional.")
        return w

    def parameter_groups(self):
        return {"generator": student_parameters(self.student)}

    def data_needs(self) -> DataNeeds:
        return DataNeeds(real=True, why_real=f"{self.name}'s inputs x_t = a_t x + s_t eps (real samples x)")

    def uses_all_parameters_every_step(self) -> bool:
        return True

    def end_step(self, step: int) -> None:
        """The target network follows the student: ``theta- <- mu theta- + (1 - mu) theta``."""
        if self.target is None:
            return
        mu = self.options.target_decay
        with torch.no_grad():
            for target, online in zip(self.target.model.parameters(), self.student.model.parameters()):
                target.mul_(mu).add_(online.detach(), alpha=1 - mu)

    def export_spec(self) -> ExportSpec:
        T = self.schedule.num_train_timesteps  # LCMScheduler samples any N from the trained grid
        return ExportSpec(self.name, "multistep", list(self.timesteps), self.exported_guidance(self.call_guidance()),
                          {"timestep_scaling": self.options.timestep_scaling,
                           "original_inference_steps": T // self.options.skip})

    def call_guidance(self) -> float:
        """The guidance of the exported call: none (the teacher's CFG is distilled in)."""
        return 0.0

    # --- the consistency loss -------------------------------------------------------------------
    def draw_guidance(self, n: int, device):
        """The teacher's CFG scale per sample (a fixed one here)."""
        return self.guidance

    def student_cond(self, cond: Conditioning | None, w) -> Conditioning | None:
        """The student's conditioning (the prompts)."""
        return cond

    def consistency(self, network: Denoiser, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        """``f(x_t, t)`` of ``network`` (the student or its target)."""
        return consistency_function(network, x_t, t, cond, self.options.timestep_scaling)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.options.loss == "huber":
            return pseudo_huber(a, b, self.options.huber_c)
        return (a.float() - b.float()).pow(2).mean()

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        x, cond = batch.real, batch.real_cond
        idx = torch.randint(len(self.grid), (len(x),), device=x.device)
        t = torch.tensor(self.grid, device=x.device)[idx]            # t_{n+k}
        t_prev = torch.tensor(self.grid_prev, device=x.device)[idx]  # t_n
        x_t = self.schedule.add_noise(x, torch.randn_like(x), t)
        w = self.draw_guidance(len(x), x.device)
        student_cond = self.student_cond(cond, w)
        with torch.no_grad():
            x_prev = SOLVERS[self.options.solver](self.teacher, x_t, t, t_prev, cond, batch.uncond, w)  # ODE step
            target = self.consistency(self.student if self.target is None else self.target, x_prev, t_prev,
                                      student_cond)
        online = self.consistency(self.student, x_t, t, student_cond)
        loss = self.distance(online, target)
        return StepOutput({"generator": loss}, {self.name: loss.detach()})

    # --- the student's sampler ------------------------------------------------------------------
    def student_x0(self, x_t: torch.Tensor, t, cond: Conditioning | None = None) -> torch.Tensor:
        """The consistency function ``f``: the multistep sampler's "x0", as ``LCMScheduler.step`` denoises."""
        return self.consistency(self.student, x_t, t, cond)


@dataclass
class LatentConsistencyOptions(GuidanceRangeOptions, ConsistencyOptions):
    """LCM. Recipe: ``[lcm]``."""

    guidance_min: float | None = option(6.0, "the teacher's CFG scale w ~ U[guidance_min, guidance_max] per sample "
                                             "(diffusers' convention; LCM's reference script: its w 5..15 is 6..16 here)")
    guidance_max: float | None = option(16.0, "see guidance_min")
    guidance_embedding: bool = option(True, "the student is told w through diffusers' guidance embedding "
                                            "(time_cond_proj_dim; a full-weight student); false: LCM-LoRA's student, "
                                            "trained at the drawn w without being told")

    def validate(self) -> None:
        ConsistencyOptions.validate(self)
        GuidanceRangeOptions.validate(self)
        if not self.guided:
            raise ValueError("lcm distils classifier-free guidance: set guidance_min and guidance_max (method 'cd' "
                             "distils without).")
        if self.guidance_scale is not None and not self.guidance_embedding:
            raise ValueError("guidance_scale is the exported call's W of a guidance-conditioned student; without "
                             "guidance_embedding the student is called without guidance.")


@register
class LatentConsistency(ConsistencyDistillation):
    """Latent consistency distillation (Luo et al. 2023) and LCM-LoRA, w drawn per sample.

    CD with a guidance-conditioned (or LoRA) student. Arguments as :class:`ConsistencyDistillation`, with
    :class:`LatentConsistencyOptions`."""

    name = "lcm"
    Options = LatentConsistencyOptions

    @classmethod
    def check_recipe(cls, options: LatentConsistencyOptions, student: StudentOptions) -> None:
        if student.lora_rank and options.guidance_embedding:
            raise ValueError("lcm.guidance_embedding = true needs a full-weight student (the embedding is a new layer); "
                             "for LCM-LoRA set lcm.guidance_embedding = false (and lcm.target_decay = 0).")
        super().check_recipe(options, student)

    def build_student(self, teacher: Denoiser, opts: StudentOptions) -> Denoiser:
        o = self.options
        if not o.guidance_embedding:
            return super().build_student(teacher, opts)
        check_guidance_network(teacher.model, "lcm.guidance_embedding")
        return make_student(teacher, guidance_dim=o.embedding_dim)

    def make_guidance(self):
        if not self.teacher.is_conditional:
            raise ValueError("lcm distils classifier-free guidance, but the teacher is unconditional; use method 'cd'.")
        return DistilledGuidance(self.options, self.options.guidance_embedding, self.default_guidance)

    def call_guidance(self) -> float:
        return self.guidance.call

    def draw_guidance(self, n: int, device):
        return self.guidance.draw(n, device)

    def student_cond(self, cond, w):
        return self.guidance.student_cond(cond, w)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning | None = None,
               generator: torch.Generator | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """Multistep consistency sampling at ``guidance_scale`` (default: the exported call's W)."""
        w = self.guidance.call if guidance_scale is None else guidance_scale
        return super().sample(noise, self.guidance.student_cond(cond, w), generator)


__all__ = ["ConsistencyDistillation", "ConsistencyOptions", "LatentConsistency", "LatentConsistencyOptions",
           "consistency_grid", "teacher_steps", "check_skip", "pseudo_huber", "LOSSES", "SOLVERS"]
