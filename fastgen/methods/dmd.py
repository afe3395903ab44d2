"""DMD: Distribution Matching Distillation (Yin et al. 2023).

A one-step generator ``G`` maps noise to x0. Its samples are pushed towards the teacher's distribution
by the difference of two x0 predictions at a noisy version of each sample -- the teacher's, with
guidance, and the fake-score critic's, trained online on ``G``'s samples -- plus a regression loss
that ties ``G(z)`` to the teacher's own deterministic sample from the same ``z`` (cached ODE pairs).
Generator and critic are updated every iteration. The math is in shared/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.denoiser import Conditioning

from .base import Batch, DataNeeds, StepOutput, register
from .distribution_matching import (DistributionMatchingLoss, DistributionMatchingMethod, DistributionMatchingOptions,
                                    RegressionOptions)


@dataclass
class DMDOptions(RegressionOptions, DistributionMatchingOptions):
    """DMD. Recipe: ``[dmd]``."""

    def validate(self) -> None:
        DistributionMatchingOptions.validate(self)
        RegressionOptions.validate(self)


@register
class DMD(DistributionMatchingMethod):
    """DMD: one-step generator, distribution matching + regression on teacher ODE pairs.

    Arguments as :class:`~.distribution_matching.DistributionMatchingMethod`, with :class:`DMDOptions`.
    """

    name = "dmd"
    Options = DMDOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.critic.head is not None:
            raise ValueError("dmd has no GAN term: set critic.gan_head = false (DMD2 has one).")
        self.regression_weight = self.options.regression_weight
        self.dm_loss = DistributionMatchingLoss()

    def check_timesteps(self, timesteps):
        if len(timesteps) != 1:
            raise ValueError(f"DMD trains one-step generators; got {len(timesteps)} timesteps (use method = \"dmd2\").")
        return timesteps

    def data_needs(self) -> DataNeeds:
        return DataNeeds(teacher_pairs=self.options.teacher_pairs(self.guidance_scale))

    # --- phase 1: generate ------------------------------------------------------------------
    def generate(self, batch: Batch, with_pairs: bool = True) -> torch.Tensor:
        """``x = G(z)``, ``z`` pure noise at ``timesteps[0]``; the ODE pairs' noise rides in the same call (with the
        regression loss and ``with_pairs``)."""
        z, cond = self.noise(batch.size), batch.cond
        if with_pairs and self.regression_weight:
            if batch.pair_noise is None:
                raise ValueError("DMD's regression loss needs teacher ODE pairs in every batch (or regression_weight=0).")
            z = torch.cat([z, batch.pair_noise.to(z)])
            cond = None if cond is None else Conditioning.cat([cond, batch.pair_cond])
        return self.student_x0(z, self.timesteps[0], cond)

    # --- phase 2: generator loss ------------------------------------------------------------
    def generator_loss(self, x: torch.Tensor, batch: Batch, x_pair: torch.Tensor | None) -> dict:
        """``{"dm": L_DM}`` on ``x`` (+ ``"reg"``: L_reg of the pairs' outputs ``x_pair``)."""
        x_t, t = self.noised(x.detach())
        with torch.no_grad():
            x0_real = self.x0_real(x_t, t, batch)
            x0_fake = self.critic.x0(x_t, t, batch.cond)
        terms = {"dm": self.dm_loss(x, x0_real, x0_fake)}
        if x_pair is not None:
            terms["reg"] = self.reg_loss(x_pair, batch.pair_target)
        return terms

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        regression_weight = self.regression_weight_at(step)  # 0 after regression_steps: no pair forward then
        x = self.generate(batch, with_pairs=bool(regression_weight))
        x, x_pair = x[:batch.size], (x[batch.size:] if regression_weight else None)
        g = self.generator_loss(x, batch, x_pair)
        c = self.critic_loss(x, batch)  # phase 3: the critic, on the same samples
        generator = g["dm"] + regression_weight * g["reg"] if "reg" in g else g["dm"]
        return StepOutput({"generator": generator, "critic": c["dsm"]}, {k: v.detach() for k, v in {**g, **c}.items()})


__all__ = ["DMD", "DMDOptions"]
