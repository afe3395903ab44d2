"""DMD2: Improved Distribution Matching Distillation (Yin et al. 2024).

DMD without the regression loss (here an option, off by default), plus: the two time-scale update
rule (the critic every iteration, the generator every ``ratio``), an optional GAN loss whose
discriminator is a small head on the critic's bottleneck features (fake and real samples, both
noised), and multi-step students trained with backward simulation. Without the GAN it is data-free:
it needs only prompts. The math is in shared/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.critic import gan_generator_loss

from .base import Batch, DataNeeds, option, register
from .distribution_matching import (DistributionMatchingLoss, DistributionMatchingMethod, DistributionMatchingOptions,
                                    GANOptions, RegressionOptions)


@dataclass
class DMD2Options(GANOptions, RegressionOptions, DistributionMatchingOptions):
    """DMD2. Recipe: ``[dmd2]``."""

    regression_weight: float = option(0.0, "lambda_reg of DMD's regression loss on teacher ODE pairs, on the "
                                           "first step's x0 (0: none, as in the DMD2 paper; it keeps diversity)")

    ratio: int = option(5, "critic updates per generator update (two time-scale rule; 5 ImageNet/SDXL, 10 SD1.5)")

    def validate(self) -> None:
        DistributionMatchingOptions.validate(self)
        RegressionOptions.validate(self)
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {self.ratio}.")
        GANOptions.validate(self)


@register
class DMD2(DistributionMatchingMethod):
    """DMD2: distribution matching with two time-scale updates, a GAN term and multi-step students.

    Arguments as :class:`~.distribution_matching.DistributionMatchingMethod`, with :class:`DMD2Options`.
    """

    name = "dmd2"
    Options = DMD2Options

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        self.init_gan()
        self.ratio = o.ratio
        self.regression_weight = o.regression_weight
        self.dm_loss = DistributionMatchingLoss()

    def data_needs(self) -> DataNeeds:
        return self.gan_data_needs("data-free DMD2: the distribution-matching loss only",
                                   teacher_pairs=self.options.teacher_pairs(self.guidance_scale))

    def generator_loss(self, x: torch.Tensor, batch: Batch) -> dict:
        """``{"dm": L_DM}`` on ``x = G(z)``, + ``"gan_g"`` = ``softplus(-D(x_t))`` with the GAN term.

        The GAN term needs the gradient through the critic's input (its weights frozen), and one critic
        call then gives both ``x0_fake`` and ``D``; without it the critic runs without grad.
        """
        if not self.gan_generator_weight:
            x_t, t = self.noised(x.detach())
            with torch.no_grad():
                x0_real, x0_fake = self.x0_real(x_t, t, batch), self.critic.x0(x_t, t, batch.cond)
            return {"dm": self.dm_loss(x, x0_real, x0_fake)}
        x_t, t = self.noised(x)
        with torch.no_grad():
            x0_real = self.x0_real(x_t.detach(), t, batch)
        x0_fake, logits = self.fake_x0_and_logits(x_t, t, batch.cond)
        return {"dm": self.dm_loss(x, x0_real, x0_fake.detach()), "gan_g": gan_generator_loss(logits)}

    def generator_update(self, x: torch.Tensor, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        g, regression_weight = self.generator_loss(x, batch), self.regression_weight_at(step)
        if regression_weight:
            g["reg"] = self.regression_loss(batch)
        loss = g["dm"] + self.gan_generator_weight * g.get("gan_g", 0.0) + regression_weight * g.get("reg", 0.0)
        return loss, g

    def critic_update(self, fake: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
        c = self.critic_loss(fake, batch)
        return (c["dsm"] + self.gan_critic_weight * c["gan_d"] if "gan_d" in c else c["dsm"]), c


__all__ = ["DMD2", "DMD2Options"]
