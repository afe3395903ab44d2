"""Distribution Matching Distillation: DMD (Yin et al. 2023) and DMD2 (Yin et al. 2024).

A generator ``G`` (a copy of the teacher, or a LoRA adapter on it) maps noise at ``t = T`` to x0 in
one step (or a few). Its samples are pushed towards the teacher's distribution by the difference of
two scores at a noisy version of each sample: the teacher's (``mu_real``, with classifier-free
guidance) and that of a critic trained online on the generator's own samples (``mu_fake``, without
guidance, :class:`~fastgen.critic.FakeScoreCritic`). The math is in shared/METHODS.md.

* :class:`DMD` -- one step, generator and critic updated every iteration, plus a regression loss on
  teacher ODE pairs (``noise -> teacher's deterministic sample``) cached beforehand.
* :class:`DMD2` -- no regression loss; two time-scale updates (critic every iteration, generator
  every ``ratio``); an optional GAN loss with its head on the critic; multi-step students trained
  with backward simulation. Without the GAN it is data-free: it needs only prompts.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastgen.critic import FakeScoreCritic, check_t_range, gan_generator_loss, sample_timesteps
from fastgen.denoiser import Conditioning, Denoiser

from .base import Batch, DistillationMethod, StepOutput, frozen, student_parameters


class DistributionMatchingLoss:
    """DMD's generator loss on ``x = G(z)`` given ``x0_real(x_t)`` and ``x0_fake(x_t)``.

    ``grad = (x0_fake - x0_real) / mean_CHW |x - x0_real|`` and
    ``L_DM = 0.5 * mean ||x - sg(x - grad)||^2``, whose gradient with respect to ``x`` is ``grad``
    (divided by the number of elements): descending it moves samples from where the critic says
    they are towards where the teacher says they should be.
    """

    def __call__(self, x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            grad = torch.nan_to_num((x0_fake - x0_real) / weight)
        return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


class RegressionLoss:
    """DMD's ``L_reg = mean ||G(z) - y||^2`` against the teacher's ODE sample ``y`` from the same ``z``.

    The paper uses LPIPS on images; on 8x8 latents LPIPS is meaningless, so this is L2.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x.float(), target.float())


class DMD(DistillationMethod):
    """DMD: one-step generator, distribution matching + regression on teacher ODE pairs.

    Args:
        teacher: the frozen teacher :class:`~fastgen.denoiser.Denoiser` (``mu_real``).
        student: the generator, from :func:`~fastgen.methods.base.make_student`.
        critic: the fake-score critic (``mu_fake``).
        guidance_scale: classifier-free guidance of the teacher in ``x0_real`` (``None`` or 1: none).
            The critic is never guided.
        regression_weight: ``lambda_reg`` (0.25 in the paper); 0 disables L_reg. With a weight, every
            batch must carry ODE pairs (``Batch.pair_noise`` / ``pair_target``).
        dm_t_range: the distribution-matching timesteps ``t ~ U[0.02 T, 0.98 T]``, as fractions of T.
        timesteps: the generator's timestep(s); DMD is one-step: ``[T - 1]``.
    """

    name = "dmd"

    def __init__(self, teacher: Denoiser, student: Denoiser, critic: FakeScoreCritic,
                 guidance_scale: float | None = None, regression_weight: float = 0.25,
                 dm_t_range: tuple[float, float] = (0.02, 0.98), timesteps: Sequence[int] = (999,)):
        super().__init__(teacher, student, timesteps)
        self.critic = critic
        self.guidance_scale = guidance_scale
        self.regression_weight = regression_weight
        self.dm_t_range = check_t_range(dm_t_range, "dm_t_range")
        self.dm_loss, self.reg_loss = DistributionMatchingLoss(), RegressionLoss()

    def parameter_groups(self):
        return {"generator": student_parameters(self.student), "critic": self.critic.trainable_parameters()}

    def updates(self, step: int) -> tuple[str, ...]:
        """The optimizer groups updated at iteration ``step``: both, every iteration."""
        return ("generator", "critic")

    # --- phase 1: generate ------------------------------------------------------------------
    def generate(self, batch: Batch) -> torch.Tensor:
        """``x = G(z)``, ``z`` pure noise at ``timesteps[0]``; the ODE pairs' noise rides in the same call."""
        z, cond = self.noise(batch.size), batch.cond
        if self.regression_weight:
            if batch.pair_noise is None:
                raise ValueError("DMD's regression loss needs teacher ODE pairs in every batch (or regression_weight=0).")
            z = torch.cat([z, batch.pair_noise.to(z)])
            cond = None if cond is None else Conditioning.cat([cond, batch.pair_cond])
        return self.student_x0(z, self.timesteps[0], cond)

    # --- phase 2: generator update ----------------------------------------------------------
    def x0_real(self, x_t: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The teacher's x0 at ``(x_t, t)`` with classifier-free guidance (both halves in one call)."""
        return self.teacher(x_t, t, batch.cond, batch.uncond, self.guidance_scale).x0

    def noised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)`` with ``t ~ U[dm_t_range]``: where the two scores are compared."""
        t = sample_timesteps(self.schedule, len(x), self.dm_t_range, x.device)
        return self.schedule.add_noise(x, torch.randn_like(x), t), t

    def generator_loss(self, x: torch.Tensor, batch: Batch, x_pair: torch.Tensor | None = None) -> dict:
        """``{"dm": L_DM}`` on ``x`` (+ ``"reg"``: L_reg of the pairs' outputs ``x_pair``)."""
        x_t, t = self.noised(x.detach())
        with torch.no_grad():
            x0_real = self.x0_real(x_t, t, batch)
            x0_fake = self.critic.x0(x_t, t, batch.cond)
        terms = {"dm": self.dm_loss(x, x0_real, x0_fake)}
        if x_pair is not None:
            terms["reg"] = self.reg_loss(x_pair, batch.pair_target)
        return terms

    # --- phase 3: critic update -------------------------------------------------------------
    def critic_loss(self, fake: torch.Tensor, batch: Batch) -> dict:
        """The critic's denoising loss on ``sg(fake)`` (+ the GAN discriminator loss with real data)."""
        return self.critic.loss(fake.detach(), batch.cond, batch.real, batch.real_cond)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        x = self.generate(batch)
        x, x_pair = x[:batch.size], (x[batch.size:] if self.regression_weight else None)
        g = self.generator_loss(x, batch, x_pair)
        c = self.critic_loss(x, batch)
        losses = {"generator": g["dm"] + self.regression_weight * g.get("reg", 0.0), "critic": c["dsm"]}
        return StepOutput(losses, {k: v.detach() for k, v in {**g, **c}.items()})


class DMD2(DMD):
    """DMD2: DMD without regression, with two time-scale updates, a GAN term and multi-step students.

    Args:
        teacher, student, critic, guidance_scale, dm_t_range: as :class:`DMD`.
        timesteps: the student's descending timesteps, e.g. ``[999]`` or ``[999, 749, 499, 249]``.
        ratio: critic updates per generator update (5 for ImageNet/SDXL, 10 for SD1.5): the critic is
            updated every iteration, the generator at iterations ``0, ratio, 2 ratio, ...``.
        gan_generator_weight: ``lambda_G`` of the generator's ``softplus(-D(fake))`` (0: no GAN;
            1e-3 SD1.5, 3e-3 ImageNet, 5e-3 SDXL in the paper). Needs a critic with a GAN head.
        gan_critic_weight: ``lambda_D`` of ``softplus(D(fake)) + softplus(-D(real))`` (1e-2 in the
            paper). Needs real samples in the batches.
    """

    name = "dmd2"

    def __init__(self, teacher: Denoiser, student: Denoiser, critic: FakeScoreCritic,
                 timesteps: Sequence[int] = (999,), guidance_scale: float | None = None, ratio: int = 5,
                 gan_generator_weight: float = 0.0, gan_critic_weight: float = 0.0,
                 dm_t_range: tuple[float, float] = (0.02, 0.98)):
        super().__init__(teacher, student, critic, guidance_scale, 0.0, dm_t_range, timesteps)
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}.")
        if (gan_generator_weight or gan_critic_weight) and critic.head is None:
            raise ValueError("DMD2's GAN loss needs a critic with a GAN head (FakeScoreCritic(gan_head=True)).")
        self.ratio = ratio
        self.gan_generator_weight, self.gan_critic_weight = gan_generator_weight, gan_critic_weight

    def updates(self, step: int) -> tuple[str, ...]:
        """Two time-scale update rule: the critic every iteration, the generator every ``ratio``."""
        return ("generator", "critic") if step % self.ratio == 0 else ("critic",)

    def generate(self, batch: Batch, k: int | None = None) -> torch.Tensor:
        """Backward simulation: draw step ``k``, run the generator *without grad* through steps
        ``0 .. k-1`` from pure noise (x0, re-noise to the next timestep), then return its output at
        step ``k`` (with grad when enabled). One-step students: ``k = 0``, ``G(z)`` at ``t = T``."""
        if k is None:
            k = int(torch.randint(len(self.timesteps), ()))
        with torch.no_grad():
            x_tk = self.simulate(self.noise(batch.size), k, batch.cond)
        return self.student_x0(x_tk, self.timesteps[k], batch.cond)

    def generator_loss(self, x: torch.Tensor, batch: Batch, x_pair=None) -> dict:
        """``{"dm": L_DM}`` (+ ``"gan_g"``: ``softplus(-D(x_t))``, the critic's weights frozen but its
        input carrying the gradient to the generator; one critic call gives both x0_fake and D)."""
        if not self.gan_generator_weight:
            return super().generator_loss(x, batch)
        x_t, t = self.noised(x)
        with torch.no_grad():
            x0_real = self.x0_real(x_t.detach(), t, batch)
        with frozen(self.critic.trainable_parameters()):
            pred, logits = self.critic(x_t, t, batch.cond, features=True)
        return {"dm": self.dm_loss(x, x0_real, pred.x0.detach()), "gan_g": gan_generator_loss(logits)}

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        losses, logs = {}, {}
        if "generator" in self.updates(step):
            x = self.generate(batch)
            g = self.generator_loss(x, batch)
            losses["generator"] = g["dm"] + self.gan_generator_weight * g.get("gan_g", 0.0)
            logs.update(g)
            fake = x.detach()  # the critic trains on the same samples
        else:
            with torch.no_grad():
                fake = self.generate(batch)
        c = self.critic_loss(fake, batch)
        losses["critic"] = c["dsm"] + self.gan_critic_weight * c.get("gan_d", 0.0)
        logs.update(c)
        return StepOutput(losses, {k: v.detach() for k, v in logs.items()})


__all__ = ["DMD", "DMD2", "DistributionMatchingLoss", "RegressionLoss"]
