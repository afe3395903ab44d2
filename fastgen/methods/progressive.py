"""Progressive distillation (Salimans & Ho 2022) and guided progressive distillation (Meng et al. 2023).

The student starts as a copy of the teacher and samples with ``N`` deterministic DDIM steps. Each round trains it so
that one of its steps equals two DDIM steps of the round's teacher; then the student becomes the frozen teacher of the
next round and ``N`` halves (64 -> 32 -> ... -> the target). Per sample, with real data ``x``, a grid step
``t -> t''`` of the student's ``N``-step grid and the midpoint ``t'`` (the teacher's ``2N``-step grid):

    x_t = a_t x + s_t eps;   x' = DDIM_teacher(x_t, t -> t');   x'' = DDIM_teacher(x', t' -> t'')
    x~  = (x'' - (s_t''/s_t) x_t) / (a_t'' - (s_t''/s_t) a_t)        (on the last step, x~ = the teacher's x0)
    L   = max(SNR_t, 1) ||x0_student(x_t, t) - x~||^2                 ("SNR truncation")

The student outputs v or x0 (an epsilon network cannot take a step to t = 0). Guided PD first distils classifier-free
guidance into a guidance-conditioned student (:mod:`fastgen.guidance_embedding`): a round in which one student step
matches one step of the teacher with CFG ``w ~ U[guidance_min, guidance_max]`` (stage 1 of Meng et al.), then the
halving rounds run on the w-conditioned networks. The same first round converts an epsilon teacher's output to the
student's v or x0 when no guidance is distilled.

Every round's ``N``-step grid is the trailing DDIM grid ``t_i = (N - i) d - 1`` of ``T' = teacher_steps * (T //
teacher_steps)`` timesteps, so the grids of all rounds nest and each round's student is exported as a plain
``DDIMScheduler(timestep_spacing="trailing")`` -- on the teacher's betas cut at ``T'`` when ``teacher_steps`` does not
divide ``T`` (64 steps of 1000: ``T' = 960``). The round and the round's teacher are state: checkpoints hold them, so a
resume continues with the right teacher. The math is in shared/METHODS.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from fastgen.denoiser import Conditioning, Denoiser
from fastgen.guidance_embedding import check_guidance_network

from .base import (Batch, DataNeeds, DistillationMethod, ExportSpec, OptimizerOptions, StepOutput, StudentOptions,
                   check_choice, make_student, option, register, student_parameters)
from .common import check_vp_teacher, ddim_step
from .guidance import DistilledGuidance, GuidanceRangeOptions

PREDICTION_TYPES = ("v_prediction", "sample")
WEIGHTINGS = ("truncated_snr", "x0", "eps")


def ddim_grid(num_train_timesteps: int, finest: int, n: int) -> list[int]:
    """The ``n``-step trailing DDIM grid shared with every coarser grid of ``finest`` steps: ``t_i = (n - i) d - 1``
    with ``d = T' / n`` and ``T' = finest * (T // finest)`` (``[959, 719, 479, 239]`` for T = 1000, 64 -> 4)."""
    top = finest * (num_train_timesteps // finest)
    return [(n - i) * (top // n) - 1 for i in range(n)]


def halvings(start: int, target: int) -> int | None:
    """How many halvings take ``start`` steps to ``target`` (``None`` when they do not)."""
    ratio = start // target if target >= 1 else 0
    if target < 1 or ratio < 2 or ratio * target != start or ratio & (ratio - 1):
        return None
    return int(math.log2(ratio))


@dataclass
class ProgressiveOptions(GuidanceRangeOptions):
    """Progressive distillation. Recipe: ``[progressive]``; ``guidance_min/max`` set: guided PD (Meng et al. 2023)."""

    teacher_steps: int = option(64, "DDIM steps of the teacher the first round halves; every round halves them, down "
                                    "to student.num_steps (64 -> 32 -> ... -> 1)")
    prediction_type: str = option("v_prediction", "the student's output: 'v_prediction' or 'sample' (x0); not "
                                                  "'epsilon', which cannot take a step to t = 0")
    first_round_weight: float = option(1.0, "train.steps is split over the rounds in proportion to their weights: "
                                            "this one for the first round when it converts the teacher (guidance, "
                                            "parameterisation), 1 for every halving round")
    weighting: str = option("truncated_snr", "the loss weight on the x0 error per timestep: 'truncated_snr' max(SNR_t, "
                                             "1) (the paper), 'x0' 1 (more weight on the high-noise steps), 'eps' "
                                             "SNR_t (the epsilon error: more weight on the low-noise steps)")

    def validate(self) -> None:
        super().validate()
        if self.teacher_steps < 2:
            raise ValueError(f"teacher_steps must be >= 2, got {self.teacher_steps}.")
        if self.prediction_type == "epsilon":
            raise ValueError("prediction_type = 'epsilon': an epsilon-output student cannot take a step to t = 0 (x0 = "
                             "(x_t - s_t eps) / a_t is ill-conditioned there); use 'v_prediction' or 'sample'.")
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        if not (math.isfinite(self.first_round_weight) and self.first_round_weight > 0):
            raise ValueError(f"first_round_weight must be > 0, got {self.first_round_weight}.")


@register
class ProgressiveDistillation(DistillationMethod):
    """Progressive distillation (Salimans & Ho 2022); guided PD (Meng et al. 2023) with a guidance range.

    Arguments as :class:`~fastgen.methods.base.DistillationMethod`, with :class:`ProgressiveOptions`; the timesteps
    are the last round's grid (:meth:`recipe_timesteps`).
    """

    name = "progressive"
    Options = ProgressiveOptions
    sampler = "ddim"
    ema_group = None  # no EMA (the paper); each round's student becomes the next round's teacher as trained
    # Adam, lr 5e-5 decayed linearly to 0 within each round (the paper; recipes add train.max_grad_norm = 1)
    optimizer_defaults = {"generator": OptimizerOptions(lr=5e-5, weight_decay=0.0, warmup_steps=0, decay="linear")}

    @classmethod
    def check_recipe(cls, options: ProgressiveOptions, student: StudentOptions) -> None:
        if student.timesteps:
            raise ValueError("progressive sets the student's timesteps itself (each round's DDIM grid): remove "
                             "student.timesteps and set student.num_steps.")
        if student.lora_rank:
            raise ValueError("progressive trains a full copy of the teacher network (the round's student becomes the "
                             "next round's teacher): set student.lora_rank = 0.")
        if halvings(options.teacher_steps, student.num_steps) is None:
            steps, chain = options.teacher_steps, [options.teacher_steps]
            while steps % 2 == 0 and steps // 2 >= student.num_steps:
                steps //= 2
                chain.append(steps)
            raise ValueError(f"progressive.teacher_steps = {options.teacher_steps} does not halve to student.num_steps "
                             f"= {student.num_steps} ({' -> '.join(map(str, chain))}): teacher_steps must be "
                             f"num_steps times a power of two >= 2, e.g. {student.num_steps * 16}.")

    @classmethod
    def recipe_timesteps(cls, num_train_timesteps: int, options: ProgressiveOptions, student: StudentOptions):
        if options.teacher_steps > num_train_timesteps:
            raise ValueError(f"progressive.teacher_steps = {options.teacher_steps} exceeds the teacher's "
                             f"{num_train_timesteps} timesteps.")
        return ddim_grid(num_train_timesteps, options.teacher_steps, student.num_steps)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        first = self.student_schedule_differs() or o.guided  # a first round of one step per teacher step (stage 1)
        steps = [o.teacher_steps] if first else []
        n = o.teacher_steps
        while n > self.student_options.num_steps:
            n //= 2
            steps.append(n)
        self.round_steps = steps  # the student's steps in each round
        self.teacher_substeps = [1] * first + [2] * (len(steps) - first)  # teacher steps per student step
        self.guidance = DistilledGuidance(o, embedded=True, recommended=self.default_guidance)
        # the round's frozen teacher: the previous round's student (unused in round 0, which uses the teacher)
        self.round_teacher = Denoiser(copy.deepcopy(self.student.model).requires_grad_(False), self.student.schedule)
        self.register_buffer("round", torch.zeros((), dtype=torch.long))

    # --- the networks -------------------------------------------------------------------------
    def build_student(self, teacher: Denoiser, opts: StudentOptions) -> Denoiser:
        """A full copy of the teacher network (with a guidance embedding for guided PD) that outputs v or x0."""
        o = self.options
        check_vp_teacher(self.name, teacher)
        if o.guided:
            check_guidance_network(teacher.model, "progressive.guidance_min/guidance_max (guided PD)")
        copy_ = make_student(teacher, guidance_dim=o.embedding_dim if o.guided else None)
        return Denoiser(copy_.model, teacher.schedule.with_prediction_type(o.prediction_type))

    def check_timesteps(self, timesteps):
        check_vp_teacher(self.name, self.teacher)  # before the grid: a flow teacher's timesteps are not on it
        grid = ddim_grid(self.schedule.num_train_timesteps, self.options.teacher_steps, self.student_options.num_steps)
        if timesteps != grid:
            raise ValueError(f"progressive's last round samples on the DDIM grid {grid} (recipe_timesteps), not "
                             f"{timesteps}.")
        return timesteps

    def student_schedule_differs(self) -> bool:
        return self.teacher.schedule.prediction_type != self.options.prediction_type

    def parameter_groups(self):
        return {"generator": student_parameters(self.student)}

    def data_needs(self) -> DataNeeds:
        return DataNeeds(real=True, why_real="progressive distillation's inputs x_t = a_t x + s_t eps (real samples x)")

    def uses_all_parameters_every_step(self) -> bool:
        return True

    # --- rounds ---------------------------------------------------------------------------------
    def rounds(self, total_steps: int) -> list[int]:
        """One round per halving, after the converting first round (guided PD, or another parameterisation),
        splitting ``train.steps`` by the rounds' weights (the last round takes the remainder)."""
        r = len(self.round_steps)
        if total_steps < r:
            raise ValueError(f"train.steps = {total_steps} is fewer than progressive's {r} rounds "
                             f"({' -> '.join(map(str, self.round_steps))} steps).")
        weights = [1.0] * r
        if self.teacher_substeps[0] == 1:
            weights[0] = self.options.first_round_weight
        steps = [max(1, int(total_steps * w / sum(weights))) for w in weights[:-1]]
        if sum(steps) >= total_steps:
            raise ValueError(f"train.steps = {total_steps} leaves no steps for progressive's last round (weights "
                             f"{weights}).")
        return steps + [total_steps - sum(steps)]

    def begin_round(self, index: int) -> None:
        """The student of the round that ended becomes the frozen teacher of round ``index``."""
        self.round_teacher.model.load_state_dict(self.student.model.state_dict())
        self.round.fill_(index)

    def grid(self, n: int | None = None) -> list[int]:
        """The ``n``-step DDIM grid (default: the current round's)."""
        n = self.round_steps[int(self.round)] if n is None else n
        return ddim_grid(self.schedule.num_train_timesteps, self.options.teacher_steps, n)

    def export_spec(self) -> ExportSpec:
        return ExportSpec(self.name, "ddim", self.grid(), self.guidance.call,
                          {"prediction_type": self.options.prediction_type})

    # --- the loss -------------------------------------------------------------------------------
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, batch: Batch, w) -> torch.Tensor:
        """One DDIM step of the round's teacher: round 0 the teacher (CFG ``w`` when guided), later the previous
        round's student (its guidance embedding fed ``w``). A clipping teacher steps with the eps of its clipped x0
        (as Salimans & Ho's implementation): with its own eps, ``x~``'s denominator ``a_t'' - (s_t''/s_t) a_t``
        (~1e-3 near t = T) would multiply the clipped part of x0 a thousandfold."""
        if int(self.round) == 0:
            return ddim_step(self.teacher, x, t, t_next, batch.real_cond, batch.uncond, w, eps_from_x0=True)
        return ddim_step(self.round_teacher, x, t, t_next, self.guidance.student_cond(batch.real_cond, w),
                         eps_from_x0=True)

    def target(self, x_t: torch.Tensor, t: torch.Tensor, batch: Batch, w) -> torch.Tensor:
        """``x~``: the x0 with which one DDIM step from ``x_t`` lands where the teacher's steps land (Salimans & Ho,
        Algorithm 2); on the grid's last step the teacher's x0 itself."""
        m = self.teacher_substeps[int(self.round)]
        n = self.round_steps[int(self.round)]
        d = (self.grid(n)[0] + 1) // n  # the student's step; the teacher's is d / m
        x = x_t
        for j in range(m):
            x = self.teacher_step(x, t - j * d // m, t - (j + 1) * d // m, batch, w)
        t_end = t - d
        a, s = self.schedule.alpha_sigma(t)
        a2, s2 = self.schedule.alpha_sigma(t_end.clamp_min(0))
        a, s, a2, s2 = (c.to(x).reshape(-1, *[1] * (x.ndim - 1)) for c in (a, s, a2, s2))
        x_tilde = (x - (s2 / s) * x_t) / (a2 - (s2 / s) * a)
        return torch.where((t_end < 0).reshape(-1, *[1] * (x.ndim - 1)), x, x_tilde)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        x = batch.real
        grid = torch.tensor(self.grid(), device=x.device)
        t = grid[torch.randint(len(grid), (len(x),), device=x.device)]
        x_t = self.schedule.add_noise(x, torch.randn_like(x), t)
        w = self.guidance.draw(len(x), x.device)
        with torch.no_grad():
            target = self.target(x_t, t, batch, w)
        x0 = self.student(x_t, t, self.guidance.student_cond(batch.real_cond, w)).x0
        snr = self.schedule.snr(t).to(x0)
        if self.options.weighting == "x0":
            weight = torch.ones_like(snr)
        elif self.options.weighting == "eps":
            weight = snr
        else:
            weight = snr.clamp_min(1.0)  # max(SNR_t, 1): the paper
        loss = (weight * (x0.float() - target.float()).pow(2).flatten(1).mean(1)).mean()
        return StepOutput({"generator": loss}, {"pd": loss.detach()})

    # --- the student's sampler ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning | None = None,
               generator: torch.Generator | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """Deterministic DDIM over the current round's grid (what the exported DDIMScheduler runs); guided students
        at ``guidance_scale`` (default: the exported call's W)."""
        w = self.guidance.call if guidance_scale is None else guidance_scale
        cond = self.guidance.student_cond(cond, w) if cond is not None else None
        grid = self.grid()
        x = noise
        for t, t_next in zip(grid, grid[1:] + [-1]):
            x = ddim_step(self.student, x, t, t_next, cond)
        return x


__all__ = ["ProgressiveDistillation", "ProgressiveOptions", "ddim_grid", "halvings", "PREDICTION_TYPES", "WEIGHTINGS"]
