"""SiD: Score identity Distillation (Zhou et al. 2024), few-step SiD (Zhou, Gu & Wang 2025) and its
guidance variants (SiD-LSG; Zero-CFG and Anti-CFG).

A generator ``x_g = G(z)`` (the student, at ``t_init = timesteps[0]``) and the fake-score critic are
updated in turn (1:1 by default). With ``x_t = x_g`` noised at ``t ~ U[t_min, t_max]``, the
teacher's x0 ``y_r`` and the critic's ``y_f``:

    L_G = sum_pixels[(y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f))] / w,   w = sg(mean_CHW |x_g - y_r|)

Unlike DMD, the gradient flows through ``x_g`` *into* both predictions (the teacher's and the critic's
weights frozen). Samples with a non-finite value are masked out of both losses and counted in the
logs (``masked``); a batch that is masked whole stops training. Few-step SiD trains a random step ``k``
of ``K`` after a no-grad rollout of the steps before it, so the uniform mixture of all steps' outputs
matches the data; it is exported like DMD2's multistep students. The math is in shared/METHODS.md.

Guidance (``guidance``; ``w = guidance_scale``, kappas as in SiD-LSG):

* ``"teacher"`` -- the teacher with CFG ``w`` (kappa_4 = w), the critic unguided;
* ``"lsg"`` -- long and short guidance: CFG ``w`` in the critic's training (kappa_1), in its
  evaluation (kappa_2 = kappa_3) and in the teacher (kappa_4);
* ``"zero"`` -- Zero-CFG: no CFG in the teacher, and the critic without text conditioning (trained and
  evaluated on the empty prompt);
* ``"anti"`` -- Anti-CFG: no CFG in the teacher, negative CFG in the critic's evaluation, at scale
  ``2 - w``. fastgen's choice of scale: with a critic equal to the teacher, ``y_r - y_f`` then holds
  the same ``(w - 1) (cond - uncond)`` term that teacher CFG ``w`` puts there.

SiDA (Zhou et al. 2024, "Adversarial Score identity Distillation"): with ``critic.gan_head`` and real images,
the critic's GAN head on its bottleneck features is also a discriminator between real and generated images,
both noised (DMD2's head and losses, :mod:`fastgen.critic`). The generator adds its GAN loss at the same
``x_t``, from the same critic call as ``y_f``, weighted as SiDA weights it: the batch's mean
``softplus(-D(x_t))`` times the number of latent values ``CHW``, divided by each sample's SiD normaliser
``w``, so that it sits on the pixel-summed scale of ``L_G``:

    L_G + lambda_G * mean_i[CHW mean_B(softplus(-D(x_t))) / w_i]

The critic adds ``lambda_D`` times the discriminator loss. Under SiD-LSG the critic trains with guidance but
its head reads unguided features, so the GAN term goes with the other guidance modes.

DMD's regression loss (``regression_weight``, off by default; not in the SiD papers): the first step's x0 from
cached teacher ODE pairs' noise against the teacher's ODE samples, as DMD2 adds it, on ``L_G``'s pixel-summed
scale (``CHW`` times the mean squared error) so that a weight weighs it against ``L_G`` as it does against
DMD's pixel-mean ``L_DM``:

    L_G + lambda_reg * CHW * mean ||G(z_pair) - y_pair||^2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen.critic import gan_generator_loss

from .base import Batch, DataNeeds, OptimizerOptions, check_choice, option, register
from .common import guided_x0
from .distribution_matching import DistributionMatchingMethod, DistributionMatchingOptions, GANOptions, RegressionOptions

GUIDANCE_MODES = ("teacher", "lsg", "zero", "anti")


@dataclass
class SiDOptions(GANOptions, RegressionOptions, DistributionMatchingOptions):
    """SiD (SiDA with the GAN weights). Recipe: ``[sid]``."""

    regression_weight: float = option(0.0, "lambda_reg of DMD's regression loss on teacher ODE pairs, on the first "
                                           "step's x0, on L_G's pixel-summed scale (0: none, as in the SiD papers)")

    alpha: float = option(1.2, "alpha of the generator loss, in [0, 2] (1.2 in the SiD paper, 1 in SiD-LSG)")
    guidance: str = option("teacher", "where classifier-free guidance goes: 'teacher' (the teacher only), 'lsg' "
                                      "(critic training, critic evaluation and teacher), 'zero' (Zero-CFG: no teacher "
                                      "CFG, critic without text), 'anti' (Anti-CFG: no teacher CFG, critic at 2 - w)")
    ratio: int = option(1, "critic updates per generator update (1: alternate 1:1, as the paper)")
    gan_generator_weight: float = option(0.0, "SiDA's lambda_adv / lambda_sid: weight of the generator's GAN loss, "
                                              "SiDA's weighting (batch-mean softplus(-D(x_t)) x CHW / w, on L_G's "
                                              "scale; not DMD2's); needs critic.gan_head and data.real; 1e-4 in SiDA")
    gan_critic_weight: float = option(0.0, "lambda_D of the discriminator loss softplus(D(fake)) + softplus(-D(real)) "
                                           "(DMD2's, unweighted; SiDA: 1 on an EDM-weighted half of it); needs "
                                           "critic.gan_head and data.real")

    def validate(self) -> None:
        DistributionMatchingOptions.validate(self)
        if not (math.isfinite(self.alpha) and 0 <= self.alpha <= 2):
            raise ValueError(f"alpha must be in [0, 2] (1.2 in the SiD paper), got {self.alpha}.")
        check_choice("guidance", self.guidance, GUIDANCE_MODES)
        if self.guidance == "zero" and self.guidance_scale is not None:
            raise ValueError(f"guidance = 'zero' uses no guidance scale; remove guidance_scale ({self.guidance_scale}).")
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}.")
        RegressionOptions.validate(self)
        GANOptions.validate(self)


class SiDLoss:
    """SiD's generator loss per sample, ``[B]``, for generated ``x_g`` and the teacher's / critic's x0 at its
    noisy version: ``sum_pixels[(y_r - y_f) ((y_r - x_g) - alpha (y_r - y_f))] / w`` with
    ``w = sg(mean |x_g - y_r|)`` clipped at 1e-5.

    Args:
        alpha: the paper's alpha (1.2; alpha = 1 gives ``(y_r - y_f) (y_f - x_g)``).
    """

    def __init__(self, alpha: float = 1.2):
        self.alpha = alpha

    @staticmethod
    @torch.no_grad()
    def normaliser(x_g: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
        """``w = sg(mean_CHW |x_g - y_real|)`` per sample, ``[B]``, clipped at 1e-5."""
        return (x_g.float() - y_real.float()).abs().flatten(1).mean(1).clamp_min(1e-5)

    def __call__(self, x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor) -> torch.Tensor:
        x_g, y_real, y_fake = x_g.float(), y_real.float(), y_fake.float()
        w = self.normaliser(x_g, y_real)
        loss = (y_real - y_fake) * ((y_real - x_g) - self.alpha * (y_real - y_fake))
        return loss.flatten(1).sum(1) / w


def sida_gan_loss(logits: torch.Tensor, w: torch.Tensor, numel: int) -> torch.Tensor:
    """SiDA's generator GAN loss: ``mean_i[numel * mean_B(softplus(-D)) / w_i]`` for the fake samples' logits
    ``[B]``, their SiD normalisers ``w`` ``[B]`` and ``numel = CHW`` values per sample."""
    return gan_generator_loss(logits) * numel * (1 / w).mean()


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """``[B]`` booleans: the samples whose values are finite in every tensor."""
    keep = torch.ones(len(tensors[0]), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        keep &= torch.isfinite(t.detach()).flatten(1).all(1)
    return keep


@register
class SiD(DistributionMatchingMethod):
    """SiD and few-step SiD, with full-weight or LoRA generator and critic on one frozen base.

    Arguments as :class:`~.distribution_matching.DistributionMatchingMethod`, with :class:`SiDOptions`;
    the number of steps ``K`` and ``t_init`` are the student's timesteps (``[t_init]`` for one step).
    """

    name = "sid"
    Options = SiDOptions
    # Adam with betas (0, 0.999), no weight decay, no warm-up (the paper; lr 1e-5 CIFAR-10, 1e-6 SD1.5)
    optimizer_defaults = {group: OptimizerOptions(lr=1e-5, betas=[0.0, 0.999], weight_decay=0.0, warmup_steps=0)
                          for group in ("generator", "critic")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        self.init_gan()
        if o.guidance != "teacher" and not self.teacher.is_conditional:
            raise ValueError(f"sid.guidance = {o.guidance!r} needs a text-conditional teacher; use 'teacher'.")
        w = self.guidance_scale
        if o.guidance in ("zero", "anti"):
            self.guidance_scale = None  # no CFG in the teacher
        self.critic_train_guidance = w if o.guidance == "lsg" else None      # kappa_1
        self.critic_eval_guidance = {"lsg": w, "anti": None if w is None else 2 - w}.get(o.guidance)  # kappa_2
        self.critic_unconditional = o.guidance == "zero"
        if self.critic.head is not None and self.critic_train_guidance is not None:
            raise ValueError("critic.gan_head: sid.guidance = 'lsg' trains the critic with guidance, but its GAN head "
                             "reads unguided features; use the GAN with guidance 'teacher', 'zero' or 'anti'.")
        self.ratio = o.ratio
        self.regression_weight = o.regression_weight
        self.sid_loss = SiDLoss(o.alpha)

    def data_needs(self) -> DataNeeds:
        return self.gan_data_needs("data-free SiD", teacher_pairs=self.options.teacher_pairs(self.guidance_scale))

    def resolve_guidance(self, value):
        if self.options.guidance == "zero":
            return None
        return super().resolve_guidance(value)

    def check_timesteps(self, timesteps):
        if any(t <= 0 for t in timesteps):
            raise ValueError(f"SiD's steps must lie above t = 0, got {timesteps}.")
        return timesteps

    def critic_cond(self, batch: Batch):
        """The critic's conditioning: the prompts, or the empty prompt under Zero-CFG."""
        return batch.uncond if self.critic_unconditional else batch.cond

    def generator_update(self, x_g: torch.Tensor, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        """SiD's generator loss (+ SiDA's GAN loss); the gradient reaches ``x_g`` through both x0 predictions
        and the critic's GAN logits, the teacher's and the critic's weights frozen."""
        x_t, t = self.noised(x_g)
        y_real = guided_x0(self.teacher, x_t, t, batch.cond, batch.uncond, self.guidance_scale)
        y_fake, logits = self.fake_x0_and_logits(x_t, t, self.critic_cond(batch), batch.uncond,
                                                 self.critic_eval_guidance)
        keep = finite_rows(x_g, y_real, y_fake, *([] if logits is None else [logits[:, None]]))
        if not keep.any():
            loss = x_g.sum() * math.nan
            return loss, {"sid": loss, "masked_g": (~keep).sum().float()}
        x_g, y_real, y_fake = x_g[keep], y_real[keep], y_fake[keep]
        sid = self.sid_loss(x_g, y_real, y_fake).mean()
        logs, loss, numel = {"sid": sid, "masked_g": (~keep).sum().float()}, sid, x_g[0].numel()  # numel: CHW
        regression_weight = self.regression_weight_at(step)
        if regression_weight:
            logs["reg"] = self.regression_loss(batch)
            loss = loss + regression_weight * numel * logs["reg"]
        if logits is not None:
            logs["gan_g"] = gan_generator_loss(logits[keep])
            gan = sida_gan_loss(logits[keep], SiDLoss.normaliser(x_g, y_real), numel)
            loss = loss + self.gan_generator_weight * gan
        return loss, logs

    def critic_update(self, fake: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The critic's denoising loss (with kappa_1 guidance under LSG), non-finite samples masked; with the
        GAN head, + ``gan_critic_weight`` times the discriminator loss on the finite samples and the real images."""
        cond, finite, real = self.critic_cond(batch), finite_rows(fake), {}
        if self.critic.head is not None:  # the discriminator loss averages the batch: non-finite samples leave first
            fake, cond = fake[finite], None if cond is None else cond.index(finite)
            real = {"real": batch.real, "real_cond": batch.uncond if self.critic_unconditional else batch.real_cond}
        c = self.critic.loss(fake, cond, uncond=batch.uncond, guidance_scale=self.critic_train_guidance,
                             per_sample=True, **real)
        keep = finite_rows(fake) & torch.isfinite(c["dsm"])
        loss = c["dsm"][keep].mean() if keep.any() else c["dsm"].sum() * math.nan
        logs = {"dsm": loss, "masked_c": ((~keep).sum() + len(finite) - len(fake)).float()}
        if "gan_d" not in c:
            return loss, logs
        logs["gan_d"] = c["gan_d"]
        return loss + self.gan_critic_weight * c["gan_d"], logs


__all__ = ["SiD", "SiDOptions", "SiDLoss", "GUIDANCE_MODES", "finite_rows", "sida_gan_loss"]
