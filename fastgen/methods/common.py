"""The pieces distillation methods share, in one place: timestep sampling, noising, the teacher's
guided x0, the straight-through clip and backward simulation.

Each is a small function of the schedule and the networks it is given; the methods
(:mod:`fastgen.methods`) and the fake-score critic (:mod:`fastgen.critic`) call them instead of
writing their own.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastgen.denoiser import Conditioning, Denoiser
from fastgen.schedule import FlowSchedule, NoiseSchedule, VPSchedule


def check_vp_teacher(method: str, teacher: Denoiser) -> None:
    """A one-line ``ValueError`` unless the teacher has a discrete VP schedule (methods that take DDIM steps of it)."""
    if not isinstance(teacher.schedule, VPSchedule):
        raise ValueError(f"{method} supports discrete VP teachers (a DDPM-family scheduler; epsilon, sample or "
                         f"v_prediction), not this {type(teacher.schedule).__name__} teacher (flow); for flow "
                         "teachers (SD3, Flux) use dmd, dmd2, sid or cd.")


def check_t_range(t_range, what: str = "t_range") -> tuple[float, float]:
    """Validate a ``(t_min, t_max)`` pair of fractions of ``T``: ``0 <= t_min <= t_max <= 1``."""
    lo, hi = (float(v) for v in t_range)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"{what} must satisfy 0 <= t_min <= t_max <= 1 (fractions of T), got {tuple(t_range)}.")
    return lo, hi


def sample_timesteps(schedule: NoiseSchedule, n: int, t_range: tuple[float, float] = (0.0, 1.0),
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` training timesteps drawn uniformly from ``[t_min T, t_max T]`` (integers for discrete VP teachers).

    Flow teachers: ``u ~ U[t_min, t_max]`` shifted as the teacher's scheduler shifts its sigmas (static ``shift``,
    or ``mu`` at the training resolution), continuous ``t = shift(u) T``: the noise levels the teacher samples at.

    Args:
        schedule: the teacher's schedule (``T = schedule.num_train_timesteps``).
        n: how many timesteps.
        t_range: ``(t_min, t_max)`` as fractions of ``T``; DMD's ``U[0.02T, 0.98T]`` is ``(0.02, 0.98)``.
        device: where the timesteps live.
    """
    T = schedule.num_train_timesteps
    lo, hi = check_t_range(t_range)
    if isinstance(schedule, VPSchedule):
        return torch.randint(int(round(lo * T)), min(int(round(hi * T)), T - 1) + 1, (n,), device=device)
    u = lo + (hi - lo) * torch.rand(n, device=device)
    if isinstance(schedule, FlowSchedule):
        return (schedule.shift_sigma(u) * T).float()
    return u * T


def noised(schedule: NoiseSchedule, x: torch.Tensor, t_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, t)``: ``x`` noised with fresh noise at ``t ~ U[t_range]`` (the timesteps are drawn first)."""
    t = sample_timesteps(schedule, len(x), t_range, x.device)
    return schedule.add_noise(x, torch.randn_like(x), t), t


def guided_x0(teacher: Denoiser, x_t: torch.Tensor, t, cond: Conditioning | None, uncond: Conditioning | None,
              guidance_scale: float | None) -> torch.Tensor:
    """The teacher's x0 at ``(x_t, t)`` with classifier-free guidance ``guidance_scale`` (``None`` or 1: none;
    both halves in one network call, see :class:`~fastgen.denoiser.Denoiser`)."""
    return teacher(x_t, t, cond, uncond, guidance_scale).x0


def ddim_step(denoiser: Denoiser, x_t: torch.Tensor, t, t_next, cond: Conditioning | None = None,
              uncond: Conditioning | None = None, guidance_scale=None, eps_from_x0: bool = False) -> torch.Tensor:
    """One deterministic DDIM step of ``denoiser`` from ``t`` to ``t_next`` (per sample, ``[B]`` or scalars):
    ``a_{t_next} x0 + s_{t_next} eps``, with x0 clipped as the schedule's samplers clip it; where ``t_next < 0``
    (past the last step) the step returns x0 itself, as the samplers' last step does.

    Args:
        denoiser: the network (teacher, round teacher or student) with its schedule.
        x_t: the samples at ``t``.
        t, t_next: integer timesteps, ``t_next < t``.
        cond, uncond, guidance_scale: conditioning and classifier-free guidance (a number or one per sample).
        eps_from_x0: take eps as implied by the clipped x0, ``(x_t - a_t x0) / s_t`` (diffusers'
            ``use_clipped_model_output=True``), instead of the network's own (the samplers' default). Equal
            without clipping.
    """
    pred = denoiser(x_t, t, cond, uncond, guidance_scale)
    x0 = pred.x0_clipped
    eps = pred.eps
    if eps_from_x0 and denoiser.schedule.clip_sample_range is not None:
        eps = denoiser.schedule.to_x0_eps(x0, x_t, t, "sample")[1]
    t_next = torch.as_tensor(t_next, device=x_t.device).expand(len(x_t))
    moved = denoiser.schedule.add_noise(x0, eps, t_next.clamp_min(0))
    return torch.where((t_next < 0).reshape(-1, *[1] * (x_t.ndim - 1)), x0, moved)


def heun_step(denoiser: Denoiser, x_t: torch.Tensor, t, t_next, cond: Conditioning | None = None,
              uncond: Conditioning | None = None, guidance_scale=None) -> torch.Tensor:
    """One step of Heun's second-order method on the probability-flow ODE from ``t`` to ``t_next >= 0`` (per sample,
    ``[B]`` or scalars): two network calls, at ``x_t`` and at the DDIM (Euler) step's end.

    In the schedule's own variables ``y = x / alpha`` and ``lambda = sigma / alpha`` (EDM's sigma) the ODE is
    ``dy / dlambda = eps(x, t)`` and a DDIM step is its Euler step, exactly; Heun's step averages the eps of both
    ends, ``y' = y + (lambda' - lambda) (eps_t + eps_t') / 2`` (Karras et al. 2022, Algorithm 1; Song et al. 2023's
    teacher solver). Written as a DDIM step from ``x_t`` with the averaged eps, whose x0 is clipped as the
    schedule's samplers clip it (without clipping: exactly Heun's step).

    Args: as :func:`ddim_step`; ``t_next`` must not pass the end (``t_next >= 0``: the second call needs it).
    """
    t_next = torch.as_tensor(t_next, device=x_t.device).expand(len(x_t))
    if torch.any(t_next < 0):
        raise ValueError("heun_step needs t_next >= 0 (its second network call is at t_next).")
    first = denoiser(x_t, t, cond, uncond, guidance_scale)
    x_euler = denoiser.schedule.add_noise(first.x0_clipped, first.eps, t_next)  # the DDIM step
    second = denoiser(x_euler, t_next, cond, uncond, guidance_scale)
    eps = (first.eps + second.eps) / 2
    x0 = denoiser.schedule.to_x0_eps(eps, x_t, t, "epsilon")[0]
    clip = denoiser.schedule.clip_sample_range
    return denoiser.schedule.add_noise(x0 if clip is None else x0.clamp(-clip, clip), eps, t_next)


def boundary_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of a consistency model's boundary condition at integer timesteps ``t``, as LCM and
    diffusers' ``LCMScheduler`` compute them: with ``u = timestep_scaling * t``,
    ``c_skip = sd^2 / (u^2 + sd^2)`` and ``c_out = u / sqrt(u^2 + sd^2)``; ``c_skip = 1``, ``c_out = 0`` at ``t = 0``.
    """
    u = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def consistency_function(denoiser: Denoiser, x_t: torch.Tensor, t, cond: Conditioning | None = None,
                         timestep_scaling: float = 10.0) -> torch.Tensor:
    """``f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)``: a consistency model over any diffusion network, x0 clipped
    as the schedule clips (straight-through, so that it trains), exactly as ``LCMScheduler.step`` denoises.

    Flow teachers: ``f = x0 = x_t - sigma v``, which meets the boundary condition ``f(x, 0) = x`` by itself, and is
    what the exported ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` step denoises."""
    x0 = straight_through_clip(denoiser(x_t, t, cond).x0, denoiser.schedule.clip_sample_range)
    if isinstance(denoiser.schedule, FlowSchedule):
        return x0
    c_skip, c_out = (c.to(x_t).reshape(-1, *[1] * (x_t.ndim - 1)) if c.ndim else c.to(x_t)
                     for c in boundary_scalings(t, timestep_scaling))
    return c_skip * x_t + c_out * x0


def straight_through_clip(x0: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``x0`` clipped to ``[-clip, clip]`` in the forward pass, with the identity as its gradient.

    An epsilon network read as x0 near ``t = T`` amplifies its errors by ``1 / sqrt(alpha_cumprod)``
    (~150x for a linear DDPM schedule), so at initialisation nearly every pixel is clipped, and a
    plain ``clamp`` would give them no gradient at all. ``clip=None``: returned unchanged.
    """
    return x0 if clip is None else x0 + (x0.clamp(-clip, clip) - x0).detach()


def backward_simulation(x0_fn: Callable[[torch.Tensor, int, Conditioning | None], torch.Tensor],
                        schedule: NoiseSchedule, noise: torch.Tensor, timesteps: Sequence[int], k: int,
                        cond: Conditioning | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x_{t_k}``: run a few-step generator through its steps ``0 .. k-1`` from ``noise``.

    Each step predicts x0 with ``x0_fn(x, t, cond)`` and re-noises it with *fresh* noise to the next
    timestep (the multistep sampler the student is exported with). DMD2's backward simulation and
    few-step SiD's rollout; ``k = 0`` returns ``noise``. Call it under ``torch.no_grad()`` for a rollout.
    """
    x = noise
    for i in range(k):
        x0 = x0_fn(x, timesteps[i], cond)
        z = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = schedule.add_noise(x0, z, timesteps[i + 1])
    return x


__all__ = ["check_vp_teacher", "check_t_range", "sample_timesteps", "noised", "guided_x0", "ddim_step", "heun_step",
           "boundary_scalings", "consistency_function", "straight_through_clip", "backward_simulation"]
