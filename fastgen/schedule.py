"""Noise schedules and conversions between model parameterisations.

A schedule maps a teacher timestep ``t`` (the value the network is conditioned on) to the
coefficients of the forward process ``x_t = alpha_t * x0 + sigma_t * noise``:

* :class:`VPSchedule` -- discrete variance-preserving teachers (DDPM, Stable Diffusion):
  ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``. Built from
  any DDPM-family diffusers scheduler config, so the betas are exactly diffusers' own.
* :class:`FlowSchedule` -- rectified-flow teachers (SD3, Flux): ``x_t = (1 - s) x0 + s noise``
  with ``s = t / num_train_timesteps`` and the velocity ``v = noise - x0``.

Every schedule converts a network output between the four parameterisations used in the
field: ``"epsilon"`` (noise), ``"sample"`` (x0), ``"v_prediction"`` (``alpha eps - sigma x0``)
and ``"flow"`` (``noise - x0``). All conversions are linear in the output for a fixed
``x_t``, which is why classifier-free guidance may be applied in any of them.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch

from .checks import check_choice

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient of shape ``[B]`` (or a scalar) to broadcast over ``like``."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Base class: ``alpha(t)``, ``sigma(t)``, ``add_noise`` and parameterisation conversions.

    Subclasses implement :meth:`alpha_sigma`. ``prediction_type`` is what the teacher network
    outputs; :meth:`convert` turns any parameterisation into any other.
    """

    prediction_type: str
    num_train_timesteps: int

    def alpha_sigma(self, t: torch.Tensor | int | float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """The forward process ``x_t = alpha_t x0 + sigma_t noise`` (``t`` scalar or ``[B]``)."""
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise

    def snr(self, t: torch.Tensor | int | float) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2``."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    # --- parameterisations -------------------------------------------------------------
    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str | None = None):
        """Return ``(x0, eps)`` implied by a prediction of the given type at ``(x_t, t)``."""
        kind = prediction_type or self.prediction_type
        alpha, sigma = (_expand(c, x_t) for c in self.alpha_sigma(t))
        if kind == "epsilon":
            eps = pred
            x0 = (x_t - sigma * eps) / alpha
        elif kind == "sample":
            x0 = pred
            eps = (x_t - alpha * x0) / sigma
        elif kind == "v_prediction":
            # v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps, with alpha^2 + sigma^2 = 1
            norm = alpha**2 + sigma**2
            x0 = (alpha * x_t - sigma * pred) / norm
            eps = (sigma * x_t + alpha * pred) / norm
        elif kind == "flow":
            # v = eps - x0 and x_t = alpha x0 + sigma eps, with alpha + sigma = 1
            x0 = (x_t - sigma * pred) / (alpha + sigma)
            eps = (x_t + alpha * pred) / (alpha + sigma)
        else:
            check_choice("prediction_type", kind, PREDICTION_TYPES)
        return x0, eps

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t, prediction_type: str | None = None):
        """Express ``(x0, eps)`` as a prediction of the given type at timestep ``t``."""
        kind = prediction_type or self.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        if kind == "flow":
            return eps - x0
        if kind == "v_prediction":
            alpha, sigma = (_expand(c, x0) for c in self.alpha_sigma(t))
            return alpha * eps - sigma * x0
        check_choice("prediction_type", kind, PREDICTION_TYPES)

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str | None = None, dst: str = "sample"):
        """Convert a prediction from parameterisation ``src`` (default: the teacher's) to ``dst``."""
        x0, eps = self.to_x0_eps(pred, x_t, t, src)
        return self.from_x0_eps(x0, eps, t, dst)


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule of a DDPM-family diffusers scheduler.

    Args:
        alphas_cumprod: ``[T]`` tensor, ``abar_t`` for the integer timesteps ``0 .. T-1``.
        prediction_type: the teacher's output, ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        final_alpha_cumprod: ``abar`` used for the "previous timestep" of the last DDIM step
            (``t = -1``); 1.0 reproduces diffusers' ``set_alpha_to_one=True``.
        clip_sample_range: if not ``None``, x0 is clipped to ``[-r, r]`` by the samplers, as the
            scheduler's ``clip_sample`` option does.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 final_alpha_cumprod: float = 1.0, clip_sample_range: float | None = None):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"A VP schedule supports epsilon, sample and v_prediction, not {prediction_type!r}.")
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_train_timesteps = len(alphas_cumprod)
        self.prediction_type = prediction_type
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.clip_sample_range = clip_sample_range

    @classmethod
    def from_scheduler_config(cls, config) -> "VPSchedule":
        """Build from any DDPM-family scheduler config (DDPM, DDIM, PNDM, LCM, Euler, DPM-Solver...).

        The betas are computed by diffusers' own ``DDPMScheduler`` from ``beta_schedule``
        (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ...), ``trained_betas`` and
        ``rescale_betas_zero_snr``, so they cannot drift from diffusers.
        """
        from diffusers import DDPMScheduler

        # Drop private keys: diffusers resets the keys listed in `_use_default_values` to the
        # *target* class's defaults when a config changes class (LCM -> DDPM would change betas).
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        if "shift" in config and "beta_schedule" not in config:
            raise ValueError("This is a flow-matching scheduler config; use FlowSchedule.from_scheduler_config.")
        # only DDPMScheduler's own keys: others (an LCM config's original_inference_steps) would be warned about
        accepted = inspect.signature(DDPMScheduler.__init__).parameters
        ddpm = DDPMScheduler.from_config({k: v for k, v in config.items() if k in accepted})
        clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
        final = 1.0 if config.get("set_alpha_to_one", True) else float(ddpm.alphas_cumprod[0])
        return cls(ddpm.alphas_cumprod, ddpm.config.prediction_type, final, clip)

    def with_prediction_type(self, prediction_type: str) -> "VPSchedule":
        """The same schedule for a network that outputs ``prediction_type`` (e.g. a student reparameterised to v)."""
        return VPSchedule(self.alphas_cumprod, prediction_type, self.final_alpha_cumprod, self.clip_sample_range)

    def alpha_sigma(self, t):
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` for integer timesteps; ``t = -1`` means "after the end"."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.all(t == t.round()):
                raise ValueError("VPSchedule timesteps must be integers in [-1, T-1].")
            t = t.round()
        t = t.long()
        if torch.any(t < -1) or torch.any(t >= self.num_train_timesteps):
            raise ValueError(f"Timesteps must lie in [0, {self.num_train_timesteps - 1}] (or -1 for the end); got {t.tolist()}.")
        table = torch.cat([self.alphas_cumprod, torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)])
        abar = table[t.cpu()]  # index -1 is the appended final value
        return abar.sqrt().float(), (1 - abar).sqrt().float()


class FlowSchedule(NoiseSchedule):
    """Rectified-flow schedule of ``FlowMatchEulerDiscreteScheduler`` teachers (SD3, Flux).

    The network is conditioned on ``t = sigma * num_train_timesteps`` with ``sigma`` in [0, 1] (continuous: a
    flow timestep need not be a whole number); ``x_t = (1 - sigma) x0 + sigma noise`` and the network predicts
    ``noise - x0`` ("flow").

    Args:
        num_train_timesteps: diffusers' ``num_train_timesteps`` (1000 for SD3 and Flux).
        shift: the static timestep shift ``sigma' = shift u / (1 + (shift - 1) u)`` (3.0 for SD3).
        mu: the resolution-dependent shift of schedulers with ``use_dynamic_shifting``: ``sigma' = e^mu /
            (e^mu + (1 / u - 1))`` (``time_shift_type="exponential"``) or ``mu / (mu + (1 / u - 1))`` ("linear");
            ``None``: the static ``shift``.
        time_shift_type: ``"exponential"`` or ``"linear"`` (diffusers' option of the same name).
        config: the teacher's scheduler config, from which :func:`fastgen.pipelines.sampler.student_timesteps`
            builds diffusers' own scheduler.
    """

    prediction_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None,
                 time_shift_type: str = "exponential", config: dict | None = None):
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.mu = None if mu is None else float(mu)
        self.time_shift_type = time_shift_type
        self.config = dict(config or {"num_train_timesteps": num_train_timesteps, "shift": shift})
        self.clip_sample_range = None

    @classmethod
    def from_scheduler_config(cls, config, image_seq_len: int | None = None) -> "FlowSchedule":
        """The schedule of a flow scheduler config; with ``use_dynamic_shifting``, ``mu`` is computed from
        ``image_seq_len`` (the number of image tokens at the training resolution) as the SD3 and Flux pipelines
        compute it (diffusers' ``calculate_shift`` with the config's ``base_/max_image_seq_len`` and
        ``base_/max_shift``)."""
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        mu = None
        if config.get("use_dynamic_shifting", False):
            if image_seq_len is None:
                raise ValueError("This flow scheduler shifts its timesteps by resolution (use_dynamic_shifting): "
                                 "the image sequence length is needed to compute mu.")
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
        return cls(config.get("num_train_timesteps", 1000), config.get("shift", 1.0), mu,
                   config.get("time_shift_type", "exponential"), config)

    def shift_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Apply the timestep shift (static, or dynamic with ``mu``) to unshifted sigmas in [0, 1], as
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` shifts them."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.mu is None:
            return self.shift * sigma / (1 + (self.shift - 1) * sigma)
        scale = math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu
        inverse = torch.where(sigma > 0, 1 / sigma.clamp_min(1e-300) - 1, torch.full_like(sigma, math.inf))
        return scale / (scale + inverse)

    def alpha_sigma(self, t):
        sigma = torch.as_tensor(t, dtype=torch.float32) / self.num_train_timesteps
        if torch.any(sigma < 0) or torch.any(sigma > 1):
            raise ValueError(f"Flow timesteps must lie in [0, {self.num_train_timesteps}]; got {torch.as_tensor(t).tolist()}.")
        return 1 - sigma, sigma


def is_flow_config(config) -> bool:
    """Whether a diffusers scheduler config is a flow-matching one (``FlowMatch*`` or a ``shift`` without betas)."""
    config = dict(config)
    return config.get("_class_name", "").startswith("FlowMatch") or ("shift" in config and "beta_schedule" not in config)


def schedule_from_scheduler_config(config, image_seq_len: int | None = None) -> NoiseSchedule:
    """Pick :class:`FlowSchedule` or :class:`VPSchedule` from a diffusers scheduler config (``image_seq_len``: the
    image tokens at the training resolution, for flow schedulers with dynamic shifting)."""
    if is_flow_config(config):
        return FlowSchedule.from_scheduler_config(config, image_seq_len)
    return VPSchedule.from_scheduler_config(config)


def schedule_timesteps(schedule: NoiseSchedule, timesteps: Sequence) -> list:
    """:func:`check_timesteps` for ``schedule``: whole numbers in [0, T-1] for a VP schedule, any numbers in
    (0, T] for a flow schedule (continuous time, ``t = sigma T``)."""
    return check_timesteps(timesteps, schedule.num_train_timesteps, continuous=isinstance(schedule, FlowSchedule))


def edm_sigma(schedule: NoiseSchedule, t) -> torch.Tensor:
    """EDM noise level ``sigma = sigma_t / alpha_t`` of a timestep (used by CD and SiD)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return sigma / alpha


def check_timesteps(timesteps: Sequence, num_train_timesteps: int | None = None, continuous: bool = False) -> list:
    """Validate a student's timestep list: strictly descending numbers. Discrete (VP) timesteps are whole numbers
    (``999.5`` is an error, not truncated to 999) in [0, T-1], returned as ints; ``continuous`` (flow) timesteps
    ``t = sigma T`` are any numbers in (0, T], returned as floats. Without ``num_train_timesteps`` only the lower
    bound is checked (recipes check that before the teacher is loaded). A one-line ``ValueError`` otherwise."""
    ts = list(timesteps)
    if not ts:
        raise ValueError("The timestep list is empty.")
    for t in ts:
        try:
            number = not isinstance(t, (bool, str)) and math.isfinite(float(t))
            whole = number and float(t).is_integer()
        except (TypeError, ValueError):
            number = whole = False
        if not (number if continuous else whole):
            kind = "finite numbers" if continuous else "whole numbers"
            raise ValueError(f"Timesteps must be {kind}, got {t!r} in {ts}.")
    ts = [float(t) for t in ts] if continuous else [int(t) for t in ts]
    high = num_train_timesteps if num_train_timesteps is not None else float("inf")
    if continuous:
        bad = [t for t in ts if not 0 < t <= high]
        top = "T" if num_train_timesteps is None else num_train_timesteps
        where = f"(0, {top}] (flow timesteps t = sigma T, sigma in (0, 1])"
    else:
        bad = [t for t in ts if not 0 <= t < high]
        top = "T-1" if num_train_timesteps is None else num_train_timesteps - 1
        where = f"[0, {top}]"
    if bad:
        raise ValueError(f"Timesteps {bad} are out of range {where}.")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"Timesteps must be strictly descending, got {ts}.")
    return ts


__all__ = ["check_timesteps", "NoiseSchedule", "VPSchedule", "FlowSchedule", "schedule_from_scheduler_config",
           "schedule_timesteps", "is_flow_config", "edm_sigma", "PREDICTION_TYPES"]
