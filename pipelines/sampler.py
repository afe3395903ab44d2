"""The student samplers fastgen uses in training, evaluation and export tests.

Three samplers, each a short function over a :class:`~fastgen.denoiser.Denoiser`:

* :func:`sample_multistep` -- DMD2 / LCM / few-step SiD: at each timestep predict x0, then
  re-noise it with *fresh* noise to the next timestep; the last x0 is the sample.
  Reproduced by diffusers' ``LCMScheduler`` (VP) and ``FlowMatchEulerDiscreteScheduler(
  stochastic_sampling=True)`` (flow).
* :func:`sample_ddim` -- deterministic DDIM on given timesteps (progressive distillation,
  the teacher's own ODE); the last step jumps to x0. Reproduced by ``DDIMScheduler(
  timestep_spacing="trailing", set_alpha_to_one=True)`` (VP) and the flow Euler scheduler.
* :func:`sample_tcd` -- TCD's strategic stochastic sampling (Zheng et al. 2024) with ``gamma``, an inference option
  of consistency students; reproduced by diffusers' ``TCDScheduler`` (VP), called with ``eta=gamma``.

Noise is drawn with diffusers' ``randn_tensor`` from the caller's generator in the same order
as diffusers' pipelines, so the same seed gives the same image in both.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from fastgen.denoiser import Conditioning, Denoiser
from fastgen.schedule import VPSchedule


def _x0(denoiser: Denoiser, x: torch.Tensor, t: int, cond, uncond, guidance_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps at ``(x, t)``, with the schedule's ``clip_sample`` applied to x0 (as diffusers does)."""
    pred = denoiser(x, t, cond, uncond, guidance_scale)
    return pred.x0_clipped, pred.eps


# ``refine(i, t, x_t, x0) -> x0``: a correction of the x0 predicted at step i (teacher guidance at inference).
Refine = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def _sample(denoiser: Denoiser, noise: torch.Tensor, timesteps: Sequence[int], cond, uncond, guidance_scale,
            progress: bool, renoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            refine: Refine | None = None, stop_at: int | None = None) -> torch.Tensor:
    """The loop both samplers share: predict (x0, eps) at t_i, move to t_{i+1} with ``renoise(x0, eps)``.

    ``refine`` replaces the x0 of a step (its eps then follows from ``x_t``); with ``stop_at`` the last step moves
    to that timestep too and ``x_{stop_at}`` is returned instead of the last x0 (a part of a longer run).
    """
    x = noise
    steps = list(timesteps)
    for i, t in enumerate(tqdm(steps, desc="sampling", disable=not progress)):
        x0, eps = _x0(denoiser, x, t, cond, uncond, guidance_scale)
        if refine is not None:
            x0 = refine(i, t, x, x0)
            alpha, sigma = denoiser.schedule.alpha_sigma(t)
            eps = (x - alpha.to(x) * x0) / sigma.to(x)
        following = steps[i + 1] if i + 1 < len(steps) else stop_at
        if following is None:
            return x0
        x = denoiser.schedule.add_noise(x0, renoise(x0, eps), following)
    return x


def sample_multistep(denoiser: Denoiser, noise: torch.Tensor, timesteps: Sequence[int],
                     cond: Conditioning | None = None, uncond: Conditioning | None = None,
                     guidance_scale: float | None = None, generator: torch.Generator | None = None,
                     progress: bool = False, refine: Refine | None = None) -> torch.Tensor:
    """x0-then-renoise sampling: ``x_{t_{i+1}} = alpha_{t_{i+1}} x0(x_{t_i}) + sigma_{t_{i+1}} z``, fresh ``z``.

    Args:
        denoiser: the student (or teacher) network with its schedule.
        noise: the starting point, pure noise at ``timesteps[0]``.
        timesteps: descending network timesteps, e.g. ``[999, 749, 499, 249]``.
        cond, uncond, guidance_scale: conditioning and classifier-free guidance (see Denoiser).
        generator: source of the fresh noise drawn at each re-noising.
        refine: optional correction of each step's x0 before it is re-noised (see ``Refine``).
    Returns:
        The final x0 prediction.
    """
    def fresh_noise(x0, _eps):  # drawn in the layout the network's pipeline draws it (Flux: packed tokens)
        return denoiser.fresh_noise(x0, generator)

    return _sample(denoiser, noise, timesteps, cond, uncond, guidance_scale, progress, fresh_noise, refine)


def sample_ddim(denoiser: Denoiser, noise: torch.Tensor, timesteps: Sequence[int],
                cond: Conditioning | None = None, uncond: Conditioning | None = None,
                guidance_scale: float | None = None, generator: torch.Generator | None = None,
                progress: bool = False, refine: Refine | None = None, stop_at: int | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): ``x_{t'} = alpha_{t'} x0 + sigma_{t'} eps``; the last step returns x0.

    Arguments as :func:`sample_multistep` (``generator`` is unused: DDIM draws no noise); with ``stop_at`` the
    last step moves on to that timestep and returns ``x_{stop_at}`` (the teacher's part of a hybrid run).
    """
    return _sample(denoiser, noise, timesteps, cond, uncond, guidance_scale, progress, lambda _x0, eps: eps, refine,
                   stop_at)


def check_gamma(gamma: float) -> float:
    """A one-line ``ValueError`` unless ``gamma`` (TCD's stochasticity, diffusers' ``eta``) lies in [0, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"gamma (TCD's stochasticity) must be a number in [0, 1] (0: deterministic), got {gamma!r}.")
    return float(gamma)


def sample_tcd(denoiser: Denoiser, noise: torch.Tensor, timesteps: Sequence[int],
               cond: Conditioning | None = None, uncond: Conditioning | None = None,
               guidance_scale: float | None = None, generator: torch.Generator | None = None,
               progress: bool = False, gamma: float = 0.3) -> torch.Tensor:
    """TCD sampling (Zheng et al. 2024), exactly as diffusers' ``TCDScheduler.step(..., eta=gamma)`` runs it.

    At ``t_i`` with next timestep ``t'`` (0 after the last): the network's x0 and eps move to ``s = floor((1 -
    gamma) t')``, ``x_s = alpha_s x0 + sigma_s eps``; before the last step fresh noise then takes ``x_s`` forward to
    ``t'``, ``x_{t'} = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z``. ``gamma = 0`` is deterministic
    (DDIM on the timesteps), ``gamma = 1`` is :func:`sample_multistep` without the boundary condition. As
    ``TCDScheduler``, it neither clips x0 nor applies a consistency model's boundary scalings, and the last step
    returns ``x_0 = alpha_0 x0 + sigma_0 eps`` (timestep 0), not x0.

    Arguments as :func:`sample_multistep` (VP schedules only), and ``gamma`` in [0, 1].
    """
    gamma = check_gamma(gamma)
    schedule = denoiser.schedule
    if not isinstance(schedule, VPSchedule):
        raise ValueError(f"TCD sampling needs a DDPM-family (VP) schedule, as TCDScheduler; this student's is a "
                         f"{type(schedule).__name__}.")
    x = noise
    steps = list(timesteps)
    for i, t in enumerate(tqdm(steps, desc="sampling", disable=not progress)):
        pred = denoiser(x, t, cond, uncond, guidance_scale)
        following = steps[i + 1] if i + 1 < len(steps) else 0
        s = math.floor((1 - gamma) * following)
        x = schedule.add_noise(pred.x0, pred.eps, s)
        if gamma > 0 and i + 1 < len(steps):
            keep = (schedule.alpha_sigma(following)[0] / schedule.alpha_sigma(s)[0]).to(x)  # sqrt(abar_t' / abar_s)
            z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = keep * x + (1 - keep**2).sqrt() * z
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"multistep": sample_multistep, "ddim": sample_ddim}


def student_timesteps(schedule, num_steps: int, sampler: str = "multistep") -> list:
    """The default timesteps of an ``num_steps``-step student, as its exported scheduler computes them.

    ``multistep``: ``LCMScheduler(original_inference_steps=N)`` -- ``[999, 749, 499, 249]`` for N=4.
    ``ddim``: ``DDIMScheduler(timestep_spacing="trailing")`` on ``T' = N (T // N)`` timesteps -- the scheduler the
    export writes (the teacher's betas cut at ``T'``), ``t_i = (N - i) (T // N) - 1``: for N dividing T diffusers'
    plain trailing grid (``[999, 749, 499, 249]`` for N=4), else ``[998, 665, 332]`` for N=3. (On all T timesteps
    ``DDIMScheduler`` would evaluate ``[999, 666, 332]`` but step from t to ``t - T // N``, 666 -> 333, off its own
    grid: no fastgen sampler, and no export, reproduces that.)
    Flow schedules (either sampler): the teacher's own ``FlowMatchEulerDiscreteScheduler`` given the evenly spaced
    sigmas ``1, 1 - 1/N, ..., 1/N`` (the Flux pipeline's default), shifted as it shifts them (static ``shift``, or
    ``mu`` at the training resolution): continuous ``t = sigma T``, e.g. ``[1000.0]`` for one step.
    Computed by diffusers' schedulers themselves, so training and export cannot disagree.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

    from fastgen.schedule import FlowSchedule

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}.")
    T = schedule.num_train_timesteps
    if isinstance(schedule, FlowSchedule):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(schedule.config)
        sigmas = [1 - i / num_steps for i in range(num_steps)]
        scheduler.set_timesteps(sigmas=sigmas, mu=schedule.mu)
        return [float(t) for t in scheduler.timesteps.double()]
    if num_steps > T:
        raise ValueError(f"num_steps = {num_steps} exceeds the teacher's {T} timesteps.")
    if sampler == "multistep":
        scheduler = LCMScheduler(num_train_timesteps=T, original_inference_steps=num_steps)
    else:
        scheduler = DDIMScheduler(num_train_timesteps=num_steps * (T // num_steps), timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]
