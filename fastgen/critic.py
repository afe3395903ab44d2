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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_choice
from .denoiser import Conditioning, Denoiser, Prediction
from .lora import AdapterDenoiser, add_lora, base_copy, lora_parameters
from .methods.base import option
from .methods.common import check_t_range, sample_timesteps
from .schedule import NoiseSchedule, edm_sigma


WEIGHTINGS = ("own", "edm")  # the critic's denoising-loss weightings (DenoisingLoss)


@dataclass
class CriticOptions:
    """The fake-score critic of distribution-matching methods. Recipe: ``[critic]``."""

    lora_rank: int = option(0, "0: full copy of the teacher network; > 0: LoRA adapter 'critic' on the frozen teacher")
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    gan_head: bool = option(False, "add DMD2's GAN head on the critic's bottleneck (needs data.real)")
    weighting: str = option("own", "critic loss: 'own' (teacher's parameterisation, eps-MSE) or 'edm' (weighted x0-MSE)")
    t_min: float = option(0.0, "critic training timesteps t ~ U[t_min T, t_max T]")
    t_max: float = option(1.0, "see t_min")

    def validate(self) -> None:
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError(f"lora_rank and lora_alpha must be >= 0, got {self.lora_rank} and {self.lora_alpha}.")
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_t_range((self.t_min, self.t_max), "t_min, t_max")


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
        check_choice("weighting", weighting, WEIGHTINGS)
        self.schedule, self.weighting, self.sigma_data = schedule, weighting, sigma_data

    def __call__(self, raw: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """``raw``: the network output at ``x_t = alpha_t x0 + sigma_t noise``; returns the mean loss
        (``per_sample=True``: one mean per sample, ``[B]``, for callers that mask samples)."""
        if self.weighting == "own":
            target = self.schedule.from_x0_eps(x0, noise, t)
            if per_sample:
                return ((raw.float() - target.float()) ** 2).flatten(1).mean(1)
            return F.mse_loss(raw.float(), target.float())
        x0_pred = self.schedule.to_x0_eps(raw, x_t, t)[0]
        sigma, sd = edm_sigma(self.schedule, t).to(x0.device), self.sigma_data
        weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).reshape(-1, *([1] * (x0.ndim - 1)))
        loss = weight * (x0_pred.float() - x0.float()) ** 2
        return loss.flatten(1).mean(1) if per_sample else loss.mean()


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
        lora_targets: module name suffixes the LoRA adapts (default: :func:`fastgen.lora.default_targets`).
        gan_head: add a :class:`GANHead` on the bottleneck features (DMD2's discriminator).
        weighting: the denoising loss, ``"own"`` (the teacher's parameterisation; eps-MSE for
            epsilon teachers) or ``"edm"`` (EDM-weighted x0-MSE), see :class:`DenoisingLoss`.
        t_range: ``(t_min, t_max)`` fractions of ``T`` for the critic's training timesteps
            (DMD2 trains it on all timesteps).
        adapter_name: the adapter's name in LoRA mode.
    """

    def __init__(self, teacher: Denoiser, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets=None, gan_head: bool = False, weighting: str = "own",
                 t_range: tuple[float, float] = (0.0, 1.0), adapter_name: str = "critic"):
        super().__init__()
        self.schedule = teacher.schedule
        self.lora = lora_rank > 0
        if self.lora:
            add_lora(teacher.model, adapter_name, rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
            self.denoiser = AdapterDenoiser(teacher.model, self.schedule, adapter_name, teacher.sample_size)
        else:
            self.denoiser = Denoiser(base_copy(teacher.model), self.schedule, teacher.sample_size)
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

    @classmethod
    def from_options(cls, teacher: Denoiser, opts: CriticOptions) -> "FakeScoreCritic":
        """The critic a recipe's ``[critic]`` section describes."""
        opts.validate()
        return cls(teacher, opts.lora_rank, opts.lora_alpha or None, gan_head=opts.gan_head, weighting=opts.weighting,
                   t_range=(opts.t_min, opts.t_max))

    def forward(self, x_t: torch.Tensor, t, cond: Conditioning | None = None, features: bool = False,
                uncond: Conditioning | None = None, guidance_scale: float | None = None
                ) -> tuple[Prediction, torch.Tensor | None]:
        """Evaluate the critic at ``(x_t, t)``; with ``features=True`` also the GAN logits.

        DMD and DMD2 never guide the critic; SiD-LSG may (``uncond`` and ``guidance_scale``, as in
        :class:`~fastgen.denoiser.Denoiser`), but not together with the GAN features.
        """
        if not features:
            return self.denoiser(x_t, t, cond, uncond, guidance_scale), None
        if self.head is None:
            raise ValueError("This critic has no GAN head (gan_head=False).")
        if guidance_scale is not None and guidance_scale != 1.0:
            raise ValueError("The critic's GAN features are taken without guidance.")
        with self.denoiser.capture_features() as captured:
            pred = self.denoiser(x_t, t, cond)
        return pred, self.head(captured[-1])

    def x0(self, x_t: torch.Tensor, t, cond: Conditioning | None = None, uncond: Conditioning | None = None,
           guidance_scale: float | None = None) -> torch.Tensor:
        """``x0_fake(x_t, t)`` for the generator step. Run it under ``torch.no_grad()`` unless gradients
        must flow through ``x_t`` (SiD); the caller freezes the critic's weights for that step."""
        return self(x_t, t, cond, uncond=uncond, guidance_scale=guidance_scale)[0].x0

    def loss(self, fake: torch.Tensor, cond: Conditioning | None = None, real: torch.Tensor | None = None,
             real_cond: Conditioning | None = None, uncond: Conditioning | None = None,
             guidance_scale: float | None = None, per_sample: bool = False) -> dict[str, torch.Tensor]:
        """The critic's update on ``sg(fake)``: ``{"dsm": denoising loss}``, plus ``"gan_d"`` with real data.

        Args:
            fake: student samples (detached here).
            cond: their conditioning.
            real: real samples in the network's space (latents), for the GAN head (needed when the
                critic has one); fake and real are noised at independent random timesteps and go
                through the critic in one batched call.
            real_cond: the real samples' conditioning.
            uncond, guidance_scale: classifier-free guidance of the critic's prediction in its own
                training (SiD-LSG's kappa_1; ``None``: none).
            per_sample: return the denoising loss per sample (``[B]``) instead of its mean, for
                callers that mask samples (SiD's NaN masking).
        """
        x0 = fake.detach()
        t = sample_timesteps(self.schedule, len(x0), self.t_range, x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        if real is None and self.head is not None:
            raise ValueError("The critic's GAN head needs real samples (a data source with images).")
        if self.head is None:  # real samples, if any, are unused without a GAN head
            pred, _ = self(x_t, t, cond, uncond=uncond, guidance_scale=guidance_scale)
            return {"dsm": self.loss_fn(pred.raw, x0, noise, x_t, t, per_sample)}
        t_real = sample_timesteps(self.schedule, len(real), self.t_range, real.device)
        real_t = self.schedule.add_noise(real, torch.randn_like(real), t_real)
        pred, logits = self(torch.cat([x_t, real_t]), torch.cat([t, t_real]), _cat(cond, real_cond), features=True,
                            guidance_scale=guidance_scale)
        n = len(x0)
        return {"dsm": self.loss_fn(pred.raw[:n], x0, noise, x_t, t, per_sample),
                "gan_d": gan_critic_loss(logits[:n], logits[n:])}


__all__ = ["FakeScoreCritic", "CriticOptions", "DenoisingLoss", "GANHead", "gan_critic_loss", "gan_generator_loss",
           "bottleneck_channels"]
