"""The fake-score critic shared by every distribution-matching method (DMD, DMD2, SiD).

The critic ``mu_fake`` is a trainable copy of the teacher, initialised from it, that learns the
score of the *student's* distribution: it is trained with the teacher's own denoising loss on
detached student samples. Comparing its prediction with the teacher's (``mu_real``) at the same
noisy sample gives the distribution-matching direction. It is either a full copy of the teacher
network, or a LoRA adapter ``"critic"`` on the teacher's own frozen network (one copy of the base
weights). An optional GAN head on its bottleneck features turns it into DMD2's discriminator.

See shared/METHODS.md, "Shared: the fake-score critic".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .denoiser import Conditioning, Denoiser, Prediction
from .lora import DEFAULT_UNET_TARGETS, AdapterDenoiser, add_lora, base_copy, lora_parameters
from .schedule import NoiseSchedule, VPSchedule, edm_sigma


def check_t_range(t_range, what: str = "t_range") -> tuple[float, float]:
    """Validate a ``(t_min, t_max)`` pair of fractions of ``T``: ``0 <= t_min <= t_max <= 1``."""
    lo, hi = (float(v) for v in t_range)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"{what} must satisfy 0 <= t_min <= t_max <= 1 (fractions of T), got {tuple(t_range)}.")
    return lo, hi


def sample_timesteps(schedule: NoiseSchedule, n: int, t_range: tuple[float, float] = (0.0, 1.0),
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` training timesteps drawn uniformly from ``[t_min T, t_max T]`` (integers for discrete VP teachers).

    Args:
        schedule: the teacher's schedule (``T = schedule.num_train_timesteps``).
        n: how many timesteps.
        t_range: ``(t_min, t_max)`` as fractions of ``T``; DMD's ``U[0.02T, 0.98T]`` is ``(0.02, 0.98)``.
    """
    T = schedule.num_train_timesteps
    lo, hi = check_t_range(t_range)
    if isinstance(schedule, VPSchedule):
        return torch.randint(int(round(lo * T)), min(int(round(hi * T)), T - 1) + 1, (n,), device=device)
    return (lo + (hi - lo) * torch.rand(n, device=device)) * T


def _cat(a: Conditioning | None, b: Conditioning | None) -> Conditioning | None:
    return None if a is None else Conditioning.cat([a, b])


class DenoisingLoss:
    """The teacher's own denoising loss, used to train the critic on student samples.

    ``weighting="own"``: MSE in the teacher's parameterisation -- ``||eps_theta(x_t, t) - eps||^2``
    for epsilon teachers (v-MSE for v-prediction, x0-MSE for sample, velocity-MSE for flow).

    ``weighting="edm"``: x0-MSE with EDM's weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``,
    ``sd = 0.5``, ``sigma = sigma_t / alpha_t``, i.e. ``lambda ||x0_theta(x_t, t) - x0||^2``.

    Args:
        schedule: the teacher's noise schedule.
        weighting: ``"own"`` or ``"edm"``.
    """

    def __init__(self, schedule: NoiseSchedule, weighting: str = "own", sigma_data: float = 0.5):
        if weighting not in ("own", "edm"):
            raise ValueError(f"weighting must be 'own' or 'edm', not {weighting!r}.")
        self.schedule, self.weighting, self.sigma_data = schedule, weighting, sigma_data

    def __call__(self, raw: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """``raw``: the network output at ``x_t = alpha_t x0 + sigma_t noise``; returns the mean loss."""
        if self.weighting == "own":
            target = self.schedule.from_x0_eps(x0, noise, t)
            return F.mse_loss(raw.float(), target.float())
        x0_pred = self.schedule.to_x0_eps(raw, x_t, t)[0]
        sigma, sd = edm_sigma(self.schedule, t).to(x0.device), self.sigma_data
        weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).reshape(-1, *([1] * (x0.ndim - 1)))
        return (weight * (x0_pred.float() - x0.float()) ** 2).mean()


class GANHead(nn.Module):
    """DMD2's discriminator head: a small network on bottleneck features, one real/fake logit per sample.

    Args:
        channels: channels of the bottleneck features (``[B, C, h, w]``), or their width for
            transformer tokens (``[B, N, C]``, with ``tokens=True``).
        hidden: width of the head (default: ``channels``).
        tokens: the features are transformer tokens, not a feature map.
    """

    def __init__(self, channels: int, hidden: int | None = None, tokens: bool = False):
        super().__init__()
        h = hidden or channels
        if tokens:  # mean over tokens of a per-token MLP
            self.body = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, h), nn.SiLU())
        else:  # two convolutions (the second strided), then a global average
            self.body = nn.Sequential(
                nn.Conv2d(channels, h, 3, padding=1), nn.GroupNorm(math.gcd(32, h), h), nn.SiLU(),
                nn.Conv2d(h, h, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(32, h), h), nn.SiLU())
        self.tokens = tokens
        self.out = nn.Linear(h, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.body(features).mean(dim=1 if self.tokens else (2, 3))
        return self.out(hidden).squeeze(-1)


def gan_critic_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))`` (non-saturating GAN)."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss ``softplus(-D(fake))``."""
    return F.softplus(-fake_logits.float()).mean()


def bottleneck_channels(model: nn.Module) -> tuple[int, bool]:
    """``(channels, tokens)`` of the network's bottleneck features: a UNet mid block's feature map,
    or a transformer block's tokens."""
    config = model.config
    if getattr(config, "block_out_channels", None):
        return int(config.block_out_channels[-1]), False
    return int(config.num_attention_heads * config.attention_head_dim), True


class FakeScoreCritic(nn.Module):
    """The fake-score network ``mu_fake``, with its denoising loss and an optional GAN head.

    Args:
        teacher: the teacher :class:`~fastgen.denoiser.Denoiser`; the critic starts as its copy.
        lora_rank: ``0`` -- a full trainable copy of the teacher network; ``> 0`` -- a LoRA adapter
            named ``adapter_name`` on the teacher's own network (whose base weights stay frozen; the
            teacher is then that network with adapters disabled, see :mod:`fastgen.lora`).
        lora_alpha: LoRA ``alpha`` (default: ``lora_rank``).
        lora_targets: module name suffixes the LoRA adapts.
        gan_head: add a :class:`GANHead` on the bottleneck features (DMD2's discriminator).
        weighting: the denoising loss, ``"own"`` (the teacher's parameterisation; eps-MSE for
            epsilon teachers) or ``"edm"`` (EDM-weighted x0-MSE), see :class:`DenoisingLoss`.
        t_range: ``(t_min, t_max)`` fractions of ``T`` for the critic's training timesteps
            (DMD2 trains it on all timesteps).
        adapter_name: the adapter's name in LoRA mode.
    """

    def __init__(self, teacher: Denoiser, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets=DEFAULT_UNET_TARGETS, gan_head: bool = False, weighting: str = "own",
                 t_range: tuple[float, float] = (0.0, 1.0), adapter_name: str = "critic"):
        super().__init__()
        self.schedule = teacher.schedule
        self.lora = lora_rank > 0
        if self.lora:
            add_lora(teacher.model, adapter_name, rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
            self.denoiser = AdapterDenoiser(teacher.model, self.schedule, adapter_name)
        else:
            self.denoiser = Denoiser(base_copy(teacher.model), self.schedule)
        self.adapter_name = adapter_name
        channels, tokens = bottleneck_channels(teacher.model)
        self.head = GANHead(channels, tokens=tokens) if gan_head else None
        self.loss_fn = DenoisingLoss(self.schedule, weighting)
        self.t_range = check_t_range(t_range, "critic t_range")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The critic's own weights (copy or adapter) and the GAN head's."""
        params = (lora_parameters(self.denoiser.model, self.adapter_name) if self.lora
                  else list(self.denoiser.model.parameters()))
        return params + (list(self.head.parameters()) if self.head is not None else [])

    def forward(self, x_t: torch.Tensor, t, cond: Conditioning | None = None,
                features: bool = False) -> tuple[Prediction, torch.Tensor | None]:
        """Evaluate the critic at ``(x_t, t)`` (never with guidance); with ``features=True`` also the GAN logits."""
        if not features:
            return self.denoiser(x_t, t, cond), None
        if self.head is None:
            raise ValueError("This critic has no GAN head (gan_head=False).")
        with self.denoiser.capture_features() as captured:
            pred = self.denoiser(x_t, t, cond)
        return pred, self.head(captured[-1])

    def x0(self, x_t: torch.Tensor, t, cond: Conditioning | None = None) -> torch.Tensor:
        """``x0_fake(x_t, t)`` for the generator step. Run it under ``torch.no_grad()`` unless gradients
        must flow through ``x_t`` (SiD); the caller freezes the critic's weights for that step."""
        return self(x_t, t, cond)[0].x0

    def loss(self, fake: torch.Tensor, cond: Conditioning | None = None, real: torch.Tensor | None = None,
             real_cond: Conditioning | None = None) -> dict[str, torch.Tensor]:
        """The critic's update on ``sg(fake)``: ``{"dsm": denoising loss}``, plus ``"gan_d"`` with real data.

        Args:
            fake: student samples (detached here).
            cond: their conditioning.
            real: real samples in the network's space (latents), for the GAN head (needed when the
                critic has one); fake and real are noised at independent random timesteps and go
                through the critic in one batched call.
            real_cond: the real samples' conditioning.
        """
        x0 = fake.detach()
        t = sample_timesteps(self.schedule, len(x0), self.t_range, x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        if real is None and self.head is not None:
            raise ValueError("The critic's GAN head needs real samples (a data source with images).")
        if self.head is None:  # real samples, if any, are unused without a GAN head
            pred, _ = self(x_t, t, cond)
            return {"dsm": self.loss_fn(pred.raw, x0, noise, x_t, t)}
        t_real = sample_timesteps(self.schedule, len(real), self.t_range, real.device)
        real_t = self.schedule.add_noise(real, torch.randn_like(real), t_real)
        pred, logits = self(torch.cat([x_t, real_t]), torch.cat([t, t_real]), _cat(cond, real_cond), features=True)
        n = len(x0)
        return {"dsm": self.loss_fn(pred.raw[:n], x0, noise, x_t, t),
                "gan_d": gan_critic_loss(logits[:n], logits[n:])}


__all__ = ["FakeScoreCritic", "DenoisingLoss", "GANHead", "gan_critic_loss", "gan_generator_loss",
           "sample_timesteps", "check_t_range", "bottleneck_channels"]
