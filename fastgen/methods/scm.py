"""sCM: continuous-time consistency distillation (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models"), applied to a flow-matching teacher through TrigFlow as SANA-Sprint (Chen et al.
2025) applies it.

**TrigFlow of a flow teacher.** With data ``x0`` and noise ``eps`` in the flow teacher's units, TrigFlow's point at
``t in [0, pi/2]`` is ``x_t = sigma_d (cos t x0 + sin t eps)`` (data and noise of standard deviation ``sigma_d``).
It is the flow point ``x_s = (1 - s) x0 + s eps`` at ``s = sin t / (sin t + cos t)``, scaled:
``x_t = sigma_d (sin t + cos t) x_s``. A flow network's velocity ``v(x_s, 1000 s)`` gives the TrigFlow network
``F(x_t / sigma_d, t) = cos t eps^ - sin t x0^ = ((1 - 2 s) x_s + (s^2 + (1 - s)^2) v) / sqrt(s^2 + (1 - s)^2)``
(the velocity ``dx_t/dt / sigma_d``), and the consistency function
``f(x_t, t) = cos t x_t - sin t sigma_d F = sigma_d (x_s - s v)``: the flow network's own x0. So the student stays a
flow network, its sampler is the flow x0-then-renoise sampler, and it exports with the teacher's
``FlowMatchEulerDiscreteScheduler`` (``stochastic_sampling``), called with ``sigmas=``, like every flow student.

**The objective** (Lu & Song, Algorithm 1, sCD), per sample: ``tau ~ N(P_mean, P_std^2)``,
``t = arctan(e^tau / sigma_d)``, ``dx_t/dt = sigma_d F_teacher`` (with the teacher's CFG),

    cos t sin t dF_/dt = JVP of F_theta-(x_t / sigma_d, t) along (cos t sin t dx_t/dt / sigma_d, cos t sin t)
    g = -cos^2 t (sigma_d F_theta- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF_/dt)
    g <- g / (rms(g) + c)                                                       (tangent normalisation, c = 0.1)
    L = ||F_theta - F_theta- - g||^2 / D / e^{logvar(t)} + logvar(t)            (adaptive weighting)

with ``theta- = stopgrad(theta)`` (no target network), ``r = min(1, step / tangent_warmup)`` (tangent warm-up) and
``rms(g) = ||g|| / sqrt(D)`` per sample (SANA-Sprint's normalisation). The JVP is ``torch.func.jvp`` of the student
under PyTorch's math attention (the fused CPU/flash kernels have no forward-mode derivative).

**Adaptive weighting**: the paper's learned ``w_phi(t) = -logvar(t)``, a small network of its own (optimizer group
``weighting``): sinusoidal features of the timestep ``1000 s`` (diffusers' ``Timesteps``) and one linear layer,
zero-initialised (EDM2's and sCM's logvar head, there a head on the network's time embedding). The loss is split so
that each group's gradient is exactly the joint loss's: the student gets ``||.||^2 / e^{sg(logvar)}``, the weighting
``sg(||.||^2) / e^{logvar} + logvar``.

VP teachers are refused with a one-line error (their discrete timesteps have no continuous-time network to
differentiate); use ``cd`` or ``lcm`` for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastgen.denoiser import Conditioning, Denoiser, check_guidance_scale
from fastgen.schedule import FlowSchedule

from .base import Batch, DataNeeds, DistillationMethod, OptimizerOptions, StepOutput, option, register


@dataclass
class ScmOptions:
    """sCM. Recipe: ``[scm]``."""

    sigma_d: float = option(0.5, "TrigFlow's data standard deviation sigma_d (sCM, SANA-Sprint: 0.5)")
    p_mean: float = option(-1.0, "training times t = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2) (sCM's "
                                 "CIFAR-10 settings: -1.0, 1.4)")
    p_std: float = option(1.4, "see p_mean")
    tangent_warmup: int = option(1000, "steps over which r rises linearly from 0 to 1 (the tangent warm-up; sCM: "
                                       "10k of 400k); 0: r = 1 from the start")
    tangent_c: float = option(0.1, "c of the tangent normalisation g / (rms(g) + c) (sCM: 0.1)")
    guidance_scale: float | None = option(None, "the teacher's fixed CFG scale; default: the teacher's recommended "
                                                "one (fastgen.zoo.RECOMMENDED_GUIDANCE), else none")
    weighting_dim: int = option(64, "sinusoidal features of the adaptive weighting network logvar(t)")

    def validate(self) -> None:
        if not (math.isfinite(self.sigma_d) and self.sigma_d > 0):
            raise ValueError(f"sigma_d must be > 0, got {self.sigma_d}.")
        if not (math.isfinite(self.p_mean) and math.isfinite(self.p_std) and self.p_std > 0):
            raise ValueError(f"p_mean must be finite and p_std > 0, got {self.p_mean} and {self.p_std}.")
        if self.tangent_warmup < 0 or not self.tangent_c > 0:
            raise ValueError(f"tangent_warmup must be >= 0 and tangent_c > 0, got {self.tangent_warmup} and "
                             f"{self.tangent_c}.")
        if self.weighting_dim < 2 or self.weighting_dim % 2:
            raise ValueError(f"weighting_dim must be an even number >= 2, got {self.weighting_dim}.")
        check_guidance_scale(self.guidance_scale)


class AdaptiveWeighting(nn.Module):
    """``logvar(t)``: sinusoidal features of the flow timestep and one linear layer, starting at 0 (weight 1)."""

    def __init__(self, dim: int):
        super().__init__()
        from diffusers.models.embeddings import Timesteps

        self.features = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(timestep).to(self.linear.weight.dtype)).squeeze(-1)


def trig_to_flow(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_s, s)``: TrigFlow's ``x = x_t / sigma_d`` at times ``t`` ``[B]`` as the flow point ``x / (sin t + cos t)``
    at ``s = sin t / (sin t + cos t)``."""
    total = (torch.sin(t) + torch.cos(t)).reshape(-1, *[1] * (x.ndim - 1))
    return x / total, torch.sin(t) / (torch.sin(t) + torch.cos(t))


def trig_velocity(x_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TrigFlow's ``F = cos t eps^ - sin t x0^`` of a flow velocity ``v`` at ``(x_s, s)``:
    ``((1 - 2 s) x_s + n^2 v) / n`` with ``n = sqrt(s^2 + (1 - s)^2)``."""
    s = s.reshape(-1, *[1] * (x_s.ndim - 1))
    n = torch.sqrt(s**2 + (1 - s) ** 2)
    return ((1 - 2 * s) * x_s + n**2 * v) / n


@register
class ContinuousConsistency(DistillationMethod):
    """sCM (Lu & Song 2024) of a flow teacher through TrigFlow: JVP tangent, tangent normalisation and warm-up,
    learned adaptive weighting. Arguments as :class:`~fastgen.methods.base.DistillationMethod`, with
    :class:`ScmOptions`."""

    name = "scm"
    Options = ScmOptions
    # Adam without weight decay; the weighting network's own rate (sCM trains both with one Adam)
    optimizer_defaults = {"generator": OptimizerOptions(lr=1e-4, weight_decay=0.0, warmup_steps=100),
                          "weighting": OptimizerOptions(lr=1e-3, weight_decay=0.0, warmup_steps=0)}

    def __init__(self, teacher: Denoiser, *args, **kwargs):
        if not isinstance(teacher.schedule, FlowSchedule):
            raise ValueError(f"scm distils flow-matching teachers (SD3, Flux, fmnist-flow) through TrigFlow, not this "
                             f"{type(teacher.schedule).__name__} teacher; for VP teachers use cd or lcm.")
        super().__init__(teacher, *args, **kwargs)
        w = self.options.guidance_scale if self.options.guidance_scale is not None else self.default_guidance
        if w is not None and not self.teacher.is_conditional:
            raise ValueError(f"scm.guidance_scale = {w}, but the teacher is unconditional.")
        self.guidance_scale = w
        self.weighting = AdaptiveWeighting(self.options.weighting_dim)

    def parameter_groups(self):
        groups = super().parameter_groups()
        return {**groups, "weighting": list(self.weighting.parameters())}

    def data_needs(self) -> DataNeeds:
        return DataNeeds(real=True, why_real="scm's inputs x_t = sigma_d (cos t x0 + sin t eps) (real samples x0)")

    def uses_all_parameters_every_step(self) -> bool:
        return True

    # --- TrigFlow ------------------------------------------------------------------------------
    def trig_network(self, network: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None,
                     uncond: Conditioning | None = None, guidance_scale=None) -> torch.Tensor:
        """``F(x, t)`` of a flow network at TrigFlow's ``x = x_t / sigma_d`` and times ``t`` ``[B]`` (the teacher
        with its CFG; a plain network evaluation otherwise, which ``torch.func.jvp`` differentiates)."""
        x_s, s = trig_to_flow(x, t)
        timestep = s * self.schedule.num_train_timesteps
        if guidance_scale is None:
            v = network.model_output(x_s, timestep, cond)
        else:
            v = network(x_s, timestep, cond, uncond, guidance_scale).flow
        return trig_velocity(x_s, s, v)

    def draw_times(self, n: int, device) -> torch.Tensor:
        """``t = arctan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``."""
        tau = self.options.p_mean + self.options.p_std * torch.randn(n, device=device)
        return torch.atan(torch.exp(tau) / self.options.sigma_d)

    def tangent(self, x_t: torch.Tensor, t: torch.Tensor, cond, uncond, step: int):
        """``(F_theta-, normalised g)`` at ``(x_t, t)``: the teacher's ODE velocity, the student's JVP, the tangent."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        o = self.options
        sd = o.sigma_d
        shape = (-1, *[1] * (x_t.ndim - 1))
        cos, sin = torch.cos(t).reshape(shape), torch.sin(t).reshape(shape)
        with torch.no_grad():
            dxdt = sd * self.trig_network(self.teacher, x_t / sd, t, cond, uncond, self.guidance_scale)
            with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no forward-mode AD
                f_minus, cs_dfdt = torch.func.jvp(lambda x, tt: self.trig_network(self.student, x, tt, cond),
                                                  (x_t / sd, t), (cos * sin * dxdt / sd, torch.cos(t) * torch.sin(t)))
            r = 1.0 if o.tangent_warmup == 0 else min(1.0, step / o.tangent_warmup)
            g = -cos**2 * (sd * f_minus - dxdt) - r * (cos * sin * x_t + sd * cs_dfdt)
            rms = g.flatten(1).norm(dim=1).reshape(shape) / math.sqrt(g[0].numel())
            return f_minus, g / (rms + o.tangent_c)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        x0, cond = batch.real, batch.real_cond
        t = self.draw_times(len(x0), x0.device)
        shape = (-1, *[1] * (x0.ndim - 1))
        x_t = self.options.sigma_d * (torch.cos(t).reshape(shape) * x0 + torch.sin(t).reshape(shape)
                                      * torch.randn_like(x0))
        f_minus, g = self.tangent(x_t, t, cond, batch.uncond, step)
        f = self.trig_network(self.student, x_t / self.options.sigma_d, t, cond)
        error = (f.float() - f_minus.float() - g.float()).pow(2).flatten(1).mean(1)  # ||.||^2 / D per sample
        logvar = self.weighting(trig_to_flow(x_t, t)[1] * self.schedule.num_train_timesteps)
        generator = (error / logvar.detach().exp()).mean()
        weighting = (error.detach() / logvar.exp() + logvar).mean()
        return StepOutput({"generator": generator, "weighting": weighting},
                          {"scm": error.mean().detach(), "logvar": logvar.mean().detach()})


__all__ = ["ContinuousConsistency", "ScmOptions", "AdaptiveWeighting", "trig_to_flow", "trig_velocity"]
