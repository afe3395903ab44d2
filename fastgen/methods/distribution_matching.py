"""What DMD, DMD2 and SiD share: a generator trained against the fake-score critic.

Each of them has a generator ``G`` (the student: a copy of the teacher or a LoRA adapter on it) and a
:class:`~fastgen.critic.FakeScoreCritic` ``mu_fake``, trained online on the generator's own samples
with the teacher's denoising loss. The generator's loss compares the teacher's x0 (``mu_real``, with
guidance) and the critic's x0 at a noisy version of each sample; the methods differ in that loss and in
their update schedule (see :mod:`.dmd`, :mod:`.dmd2`, :mod:`.sid`). DMD2 and SiD (as SiDA) may add a GAN
term on real images whose discriminator is the critic's GAN head, and DMD's regression loss on cached teacher
ODE pairs (DMD's own, an option of DMD2 and SiD); their checks, data needs and critic calls live here. The math
is in shared/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgen.critic import CriticOptions, FakeScoreCritic
from fastgen.denoiser import Conditioning, check_guidance_scale

from .base import (Batch, DataNeeds, DistillationMethod, OptimizerOptions, StepOutput, TeacherPairs, frozen, option,
                   student_parameters)
from .common import check_t_range, guided_x0, noised


@dataclass
class DistributionMatchingOptions:
    """Options every distribution-matching method has (its recipe section starts with these)."""

    guidance_scale: float | None = option(None, "teacher CFG in the generator's loss; default: the teacher's "
                                                "recommended one (fastgen.zoo.RECOMMENDED_GUIDANCE), else none")
    dm_t_min: float = option(0.02, "the generator loss's timesteps t ~ U[dm_t_min T, dm_t_max T]")
    dm_t_max: float = option(0.98, "see dm_t_min")

    def validate(self) -> None:
        check_guidance_scale(self.guidance_scale)
        check_t_range((self.dm_t_min, self.dm_t_max), "dm_t_min, dm_t_max")


@dataclass
class GANOptions:
    """The GAN term on real images (DMD2, SiDA): weights of the generator's and the discriminator's losses.

    The discriminator is the critic's GAN head (``critic.gan_head``); both weights 0 and no head: data-free.
    A method whose generator term is weighted differently redefines ``gan_generator_weight``'s help.
    """

    gan_generator_weight: float = option(0.0, "lambda_G of the generator's GAN loss softplus(-D(fake)) "
                                              "(needs critic.gan_head and data.real; 1e-3 SD1.5, 5e-3 SDXL)")
    gan_critic_weight: float = option(0.0, "lambda_D of the discriminator loss softplus(D(fake)) + softplus(-D(real)) "
                                           "(needs critic.gan_head and data.real; 1e-2 in the paper)")

    def validate(self) -> None:
        if self.gan_generator_weight < 0 or self.gan_critic_weight < 0:
            raise ValueError(f"gan_generator_weight and gan_critic_weight must be >= 0, got "
                             f"{self.gan_generator_weight} and {self.gan_critic_weight}.")


@dataclass
class RegressionOptions:
    """DMD's regression loss on cached teacher ODE pairs (DMD: on by default; DMD2, SiD: an option, off by default)."""

    regression_weight: float = option(0.25, "lambda_reg of the regression loss on teacher ODE pairs (0: none)")
    ode_pairs: int = option(1024, "number of cached teacher ODE pairs")
    ode_steps: int = option(50, "DDIM steps of the teacher's ODE sampler for the pairs")
    pair_batch_size: int = option(0, "ODE pairs per batch (0: train.batch_size)")
    regression_steps: int = option(0, "iterations with the regression loss, then the other terms alone: a last "
                                      "phase free of the ODE's pull (0: the whole run)")

    def validate(self) -> None:
        if self.regression_weight < 0 or self.regression_steps < 0:
            raise ValueError(f"regression_weight and regression_steps must be >= 0, got {self.regression_weight} "
                             f"and {self.regression_steps}.")
        if self.regression_weight and (self.ode_pairs < 1 or self.ode_steps < 1 or self.pair_batch_size < 0):
            raise ValueError(f"ode_pairs and ode_steps must be >= 1 and pair_batch_size >= 0, got {self.ode_pairs}, "
                             f"{self.ode_steps} and {self.pair_batch_size}.")

    def teacher_pairs(self, guidance_scale: float | None) -> TeacherPairs | None:
        """The ODE pairs the regression loss needs (``None`` without it), sampled at ``guidance_scale``."""
        if not self.regression_weight:
            return None
        return TeacherPairs(self.ode_pairs, self.ode_steps, guidance_scale, self.pair_batch_size)


class RegressionLoss:
    """DMD's ``L_reg = mean ||G(z) - y||^2`` against the teacher's ODE sample ``y`` from the same ``z``.

    The paper uses LPIPS on images; on 8x8 latents LPIPS is meaningless, so this is L2.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x.float(), target.float())


class DistributionMatchingLoss:
    """DMD's generator loss on ``x = G(z)`` given ``x0_real(x_t)`` and ``x0_fake(x_t)`` (DMD and DMD2).

    ``grad = (x0_fake - x0_real) / mean_CHW |x - x0_real|`` and
    ``L_DM = 0.5 * mean ||x - sg(x - grad)||^2``, whose gradient with respect to ``x`` is ``grad``
    (divided by the number of elements): descending it moves samples from where the critic says
    they are towards where the teacher says they should be.
    """

    def __call__(self, x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # no nan_to_num: a non-finite prediction must stop training, not vanish
            weight = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-5)
            grad = (x0_fake - x0_real) / weight
        return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


class DistributionMatchingMethod(DistillationMethod):
    """Base of DMD, DMD2 and SiD: the generator, the critic and the phases they share.

    Arguments as :class:`~fastgen.methods.base.DistillationMethod`; ``critic`` holds the
    :class:`~fastgen.critic.CriticOptions` of the fake-score critic (a full copy of the teacher network
    or a LoRA adapter on it, with an optional GAN head). The teacher's guidance is
    ``options.guidance_scale``, else ``default_guidance``.
    """

    Options = DistributionMatchingOptions
    sections = ("student", "critic")
    optimizer_defaults = {"generator": OptimizerOptions(), "critic": OptimizerOptions()}

    def __init__(self, teacher, timesteps, options=None, student=None, critic: CriticOptions | None = None,
                 default_guidance: float | None = None, student_init=None):
        super().__init__(teacher, timesteps, options, student, critic, default_guidance, student_init)
        self.check_teacher_output()
        self.critic = FakeScoreCritic.from_options(teacher, critic or CriticOptions())
        self.guidance_scale = self.resolve_guidance(self.options.guidance_scale)
        self.dm_t_range = (self.options.dm_t_min, self.options.dm_t_max)
        self.reg_loss = RegressionLoss()  # used where the options have a regression_weight (DMD, DMD2, SiD)

    def check_teacher_output(self) -> None:
        """The losses read the teacher's output as x0: it must have its input's shape (no learned variance)."""
        config = self.teacher.model.config
        c_in, c_out = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
        if c_in is not None and c_out is not None and c_out != c_in:
            raise ValueError(
                f"{self.name} reads the teacher's output as x0 (epsilon, v_prediction, sample or flow), but this teacher "
                f"network outputs {c_out} channels for {c_in} input channels (a learned variance, e.g. "
                f"variance_type='learned_range'); such teachers are not supported.")

    def resolve_guidance(self, value: float | None) -> float | None:
        """The teacher's guidance: ``value``, else the recommended one; an error on unconditional teachers."""
        guidance = value if value is not None else self.default_guidance
        if guidance is not None and not self.teacher.is_conditional:
            raise ValueError(f"{self.name}.guidance_scale = {guidance}, but the teacher is unconditional.")
        return guidance

    def parameter_groups(self):
        return {"generator": student_parameters(self.student), "critic": self.critic.trainable_parameters()}

    # --- phases shared by the siblings --------------------------------------------------------
    def generate(self, batch: Batch, k: int | None = None) -> torch.Tensor:
        """The generator's output at a random step ``k`` (backward simulation: steps ``0 .. k-1`` run from
        pure noise without grad, then step ``k`` with grad when enabled). One-step students: ``G(z)``."""
        if k is None:
            k = int(torch.randint(len(self.timesteps), ()))
        with torch.no_grad():
            x_tk = self.simulate(self.noise(batch.size), k, batch.cond)
        return self.student_x0(x_tk, self.timesteps[k], batch.cond)

    def noised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)`` with ``t ~ U[dm_t_range]``: where the teacher and the critic are compared."""
        return noised(self.schedule, x, self.dm_t_range)

    def x0_real(self, x_t: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The teacher's x0 at ``(x_t, t)`` with classifier-free guidance ``guidance_scale``."""
        return guided_x0(self.teacher, x_t, t, batch.cond, batch.uncond, self.guidance_scale)

    def regression_weight_at(self, step: int) -> float:
        """lambda_reg at iteration ``step``: ``regression_weight`` for the first ``regression_steps`` iterations
        (every iteration when 0), then 0."""
        steps = self.options.regression_steps
        return self.regression_weight if not steps or step < steps else 0.0

    def regression_loss(self, batch: Batch) -> torch.Tensor:
        """DMD's ``L_reg`` as DMD2 and SiD add it: the first step's x0 from the pairs' noise
        against the teacher's ODE samples."""
        if batch.pair_noise is None:
            raise ValueError(f"{self.name}.regression_weight > 0 needs teacher ODE pairs in every batch.")
        return self.reg_loss(self.student_x0(batch.pair_noise, self.timesteps[0], batch.pair_cond), batch.pair_target)

    def critic_loss(self, fake: torch.Tensor, batch: Batch) -> dict:
        """The critic's denoising loss on ``sg(fake)`` (+ the GAN discriminator loss with real data)."""
        return self.critic.loss(fake.detach(), batch.cond, batch.real, batch.real_cond)

    # --- the GAN term of DMD2 and SiD (SiDA): the critic's head as discriminator, on real images -----
    gan_generator_weight: float = 0.0
    gan_critic_weight: float = 0.0

    def init_gan(self) -> None:
        """Read :class:`GANOptions` from the options; one-line errors when the weights and the critic's head
        disagree."""
        o, name = self.options, self.name
        if (o.gan_generator_weight or o.gan_critic_weight) and self.critic.head is None:
            raise ValueError(f"{name}.gan_generator_weight / gan_critic_weight need the critic's GAN head: "
                             "set critic.gan_head = true.")
        if self.critic.head is not None and not (o.gan_generator_weight or o.gan_critic_weight):
            raise ValueError(f"critic.gan_head = true trains a GAN head only with {name}.gan_generator_weight or "
                             f"{name}.gan_critic_weight > 0 (and data.real); set a weight, or critic.gan_head = false.")
        self.gan_generator_weight, self.gan_critic_weight = o.gan_generator_weight, o.gan_critic_weight

    def gan_data_needs(self, data_free: str, **needs) -> DataNeeds:
        """The data needs with the GAN term: real images when it is on. ``data_free`` names what the method
        trains without them; ``needs``: the method's other :class:`~.base.DataNeeds`."""
        gan = self.critic.head is not None and (self.gan_generator_weight > 0 or self.gan_critic_weight > 0)
        n = self.name
        return DataNeeds(real=gan, why_real=f"{n}'s GAN loss (critic.gan_head with {n}.gan_*_weight > 0)",
                         without_real=f"{n}.gan_generator_weight = 0, {n}.gan_critic_weight = 0 and critic.gan_head "
                                      f"= false ({data_free})", **needs)

    def fake_x0_and_logits(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None,
                           uncond: Conditioning | None = None, guidance_scale: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The critic's x0 at ``(x_t, t)`` and, with the generator's GAN term, its GAN logits (else ``None``),
        its weights frozen so that gradients reach only ``x_t``. One critic call gives both, unless the
        prediction is guided (SiD-LSG, Anti-CFG): the GAN features are then taken in a second, unguided call."""
        with frozen(self.critic.trainable_parameters()):
            if not self.gan_generator_weight:
                return self.critic.x0(x_t, t, cond, uncond, guidance_scale), None
            if guidance_scale is None:
                pred, logits = self.critic(x_t, t, cond, features=True)
                return pred.x0, logits
            return self.critic.x0(x_t, t, cond, uncond, guidance_scale), self.critic(x_t, t, cond, features=True)[1]

    # --- the alternation of DMD2 and SiD ------------------------------------------------------
    ratio: int = 1  # critic updates per generator update

    def updates(self, step: int) -> tuple[str, ...]:
        """The groups updated at iteration ``step``: the critic every iteration, the generator every ``ratio``."""
        return ("generator", "critic") if step % self.ratio == 0 else ("critic",)

    def uses_all_parameters_every_step(self) -> bool:
        return self.ratio == 1  # the generator rests on the other iterations

    def generator_update(self, x: torch.Tensor, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        """``(loss, logged terms)`` of the generator on its samples ``x`` (with grad) at iteration ``step``."""
        raise NotImplementedError

    def critic_update(self, fake: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict]:
        """``(loss, logged terms)`` of the critic on detached generator samples."""
        raise NotImplementedError

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        """One iteration: the generator (when :meth:`updates` says so) on fresh samples, then the critic on
        the same samples, detached (fresh ones, without grad, when the generator rests)."""
        losses, logs = {}, {}
        if "generator" in self.updates(step):
            x = self.generate(batch)
            losses["generator"], g = self.generator_update(x, batch, step)
            logs.update(g)
            fake = x.detach()
        else:
            with torch.no_grad():
                fake = self.generate(batch)
        losses["critic"], c = self.critic_update(fake, batch)
        logs.update(c)
        return StepOutput(losses, {k: v.detach() for k, v in logs.items()})


__all__ = ["DistributionMatchingMethod", "DistributionMatchingOptions", "DistributionMatchingLoss", "GANOptions",
           "RegressionLoss", "RegressionOptions"]
