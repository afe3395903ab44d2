"""The fake-score critic, DMD / DMD2 / SiD losses and update rules, backward simulation and LoRA roles."""

import pytest
import torch
from conftest import tiny_cond_unet, tiny_unet
from diffusers import DDPMScheduler

from fastgen.critic import CriticOptions, FakeScoreCritic
from fastgen.denoiser import Conditioning, Denoiser
from fastgen.lora import AdapterDenoiser, lora_parameters
from fastgen.methods import Batch, ExportSpec, StudentOptions
from fastgen.methods.distribution_matching import DistributionMatchingLoss
from fastgen.methods.dmd import DMD, DMDOptions
from fastgen.methods.dmd2 import DMD2, DMD2Options
from fastgen.methods.sid import SiD, SiDLoss, SiDOptions
from fastgen.pipelines.sampler import sample_multistep
from fastgen.schedule import VPSchedule, edm_sigma


def schedule(prediction_type="epsilon", clip_sample=False):
    config = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip_sample).config
    return VPSchedule.from_scheduler_config(config)


def uncond_dmd2(timesteps=(999,), prediction_type="epsilon", **options):
    teacher = Denoiser(tiny_unet(), schedule(prediction_type))
    return DMD2(teacher, timesteps, DMD2Options(**options))


def test_critic_loss_is_the_teachers_eps_mse():
    sched = schedule()
    teacher = Denoiser(tiny_unet(), sched)
    critic = FakeScoreCritic(teacher)
    assert critic.denoiser.model is not teacher.model  # a full copy ...
    x = torch.randn(4, 1, 8, 8)
    t_probe = torch.tensor([0, 300, 999, 500])
    with torch.no_grad():  # ... with the teacher's weights
        torch.testing.assert_close(critic.denoiser(x, t_probe).raw, teacher(x, t_probe).raw)

    torch.manual_seed(3)
    loss = critic.loss(x)["dsm"]
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (4,))
    noise = torch.randn_like(x)
    abar = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
    eps = critic.denoiser.model(x_t, t).sample
    torch.testing.assert_close(loss, ((eps - noise) ** 2).mean())

    # the documented x0-weighted (EDM) variant: lambda(sigma) ||x0_theta - x0||^2
    edm = FakeScoreCritic(teacher, weighting="edm")
    torch.manual_seed(3)
    loss = edm.loss(x)["dsm"]
    x0_pred = (x_t - (1 - abar).sqrt() * edm.denoiser.model(x_t, t).sample) / abar.sqrt()
    sigma = edm_sigma(sched, t).reshape(-1, 1, 1, 1)
    weight = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    torch.testing.assert_close(loss, (weight * (x0_pred - x) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_critic_loss_decreases_on_fixed_samples():
    critic = FakeScoreCritic(Denoiser(tiny_unet(), schedule()))
    fake = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).repeat(16, 1, 1, 1)  # fixed "student samples"

    def probe():
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return sum(critic.loss(fake)["dsm"].item() for _ in range(4)) / 4

    before = probe()
    opt = torch.optim.Adam(critic.trainable_parameters(), lr=2e-3)
    for _ in range(30):
        loss = critic.loss(fake)["dsm"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probe() < 0.7 * before


def test_distribution_matching_gradient_formula():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    x0_real, d = torch.randn(2, 1, 8, 8), 0.3
    DistributionMatchingLoss()(x, x0_real, x0_real + d).backward()
    weight = (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    torch.testing.assert_close(x.grad, (d / weight / x.numel()).expand_as(x))
    assert (x.grad > 0).all()  # gradient descent moves every sample by -d: towards the teacher


def test_dm_gradient_vanishes_when_the_critic_equals_the_teacher():
    method = uncond_dmd2()  # critic = teacher copy, no guidance: fake score == real score
    batch = Batch(4)
    x = method.generate(batch)
    loss = method.generator_loss(x, batch)["dm"]
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in method.parameter_groups()["generator"])


def test_generator_update_moves_samples_against_the_critic_shift():
    """Critic's x0 = teacher's x0 + d (x0-predicting networks, shifted output bias): descending L_DM
    moves the generator's samples by -d, closing the gap."""
    method = uncond_dmd2(prediction_type="sample")
    d = 0.5
    with torch.no_grad():
        method.critic.denoiser.model.conv_out.bias.add_(d)
        x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 800])
        gap = method.critic.x0(x_t, t) - method.teacher(x_t, t).x0
        torch.testing.assert_close(gap, torch.full_like(gap, d))
    z = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        before = method.student_x0(z, 999)
    opt = torch.optim.SGD(method.parameter_groups()["generator"], lr=1.0)
    loss = method.generator_loss(method.generate(Batch(8)), Batch(8))["dm"]
    loss.backward()
    assert method.critic.denoiser.model.conv_out.bias.grad is None  # the critic is not trained by the generator step
    opt.step()
    with torch.no_grad():
        moved = method.student_x0(z, 999) - before
    assert moved.mean() < 0 and (moved < 0).float().mean() > 0.9


def test_two_time_scale_update_rule():
    method = uncond_dmd2(ratio=3)
    assert [("generator" in method.updates(s)) for s in range(7)] == [True, False, False, True, False, False, True]
    assert all("critic" in method.updates(s) for s in range(7))
    out = method(Batch(2), 1)
    assert set(out.losses) == {"critic"}
    out = method(Batch(2), 3)
    assert set(out.losses) == {"generator", "critic"} and {"dm", "dsm"} <= set(out.logs)
    dmd = DMD(method.teacher, (999,), DMDOptions(regression_weight=0.0))
    out = dmd(Batch(2), 1)
    assert set(out.losses) == {"generator", "critic"}  # DMD: both, every iteration


@pytest.mark.parametrize("method_class, options_class, ratio", [(DMD, DMDOptions, {}), (DMD2, DMD2Options, {"ratio": 2}),
                                                                (SiD, SiDOptions, {})])
def test_regression_loss_pulls_the_first_step_towards_the_teachers_ode_pairs(method_class, options_class, ratio):
    """DMD's regression term (DMD2 and SiD: the same option): declared as teacher-pair data, logged as ``reg``,
    and generator updates on a fixed pair batch pull ``G(z_pair)`` towards the pairs' targets."""
    teacher = Denoiser(tiny_unet(), schedule())
    method = method_class(teacher, (999, 499)[:1 if method_class is DMD else 2],
                          options_class(regression_weight=1.0, ode_pairs=8, ode_steps=5, **ratio))
    needs = method.data_needs()
    assert needs.teacher_pairs is not None and (needs.teacher_pairs.count, needs.teacher_pairs.steps) == (8, 5)
    batch = Batch(4)
    batch.pair_noise, batch.pair_target = torch.randn(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)
    opt = torch.optim.Adam(method.parameter_groups()["generator"], lr=1e-3)
    regs = []
    for _ in range(15):
        out = method(batch, 0)  # step 0: a generator update for both methods
        regs.append(float(out.logs["reg"]))
        opt.zero_grad()
        out.losses["generator"].backward()
        opt.step()
    assert regs[-1] < 0.7 * regs[0]
    assert options_class().regression_weight == (0.25 if method_class is DMD else 0.0)  # DMD2, SiD: off by default
    with pytest.raises(ValueError, match="regression_weight and regression_steps must be >= 0"):
        options_class(regression_weight=-1.0).validate()


@pytest.mark.parametrize("method_class, options_class, ratio", [(DMD, DMDOptions, {}), (DMD2, DMD2Options, {"ratio": 2}),
                                                                (SiD, SiDOptions, {})])
def test_regression_steps_end_the_regression_loss(method_class, options_class, ratio):
    """``regression_steps = N``: the pairs' targets move the generator loss before iteration N, not from it on."""
    teacher = Denoiser(tiny_unet(), schedule())
    method = method_class(teacher, (999, 499)[:1 if method_class is DMD else 2],
                          options_class(regression_weight=1.0, regression_steps=2, ode_pairs=8, ode_steps=5, **ratio))
    batch = Batch(4)
    batch.pair_noise = torch.randn(4, 1, 8, 8)

    def generator_loss(step: int, target: float) -> float:
        batch.pair_target = torch.full((4, 1, 8, 8), target)
        torch.manual_seed(0)  # the same samples, noise and timesteps for both targets
        return float(method(batch, step).losses["generator"])

    assert generator_loss(0, 0.0) != generator_loss(0, 1.0)  # iteration 0 < 2: with the regression loss
    assert generator_loss(2, 0.0) == generator_loss(2, 1.0)  # iteration 2 (a generator update for every ratio): none
    with pytest.raises(ValueError, match="regression_weight and regression_steps must be >= 0"):
        options_class(regression_steps=-1).validate()


def test_backward_simulation_runs_earlier_steps_without_grad():
    method = uncond_dmd2(timesteps=(999, 749, 499, 249))
    calls = []
    hook = method.student.model.register_forward_pre_hook(
        lambda module, args: calls.append((torch.is_grad_enabled(), int(args[1][0]), args[0].requires_grad)))
    for k in range(4):
        calls.clear()
        x = method.generate(Batch(3), k=k)
        assert x.shape == (3, 1, 8, 8) and x.requires_grad
        assert [c[0] for c in calls] == [False] * k + [True]  # only step k's forward builds a graph
        assert [c[1] for c in calls] == [999, 749, 499, 249][:k + 1]
        assert calls[-1][2] is False  # its input x_{t_k} carries no gradient from the earlier steps
    hook.remove()
    torch.manual_seed(0)
    method.generate(Batch(3)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameter_groups()["generator"])


def test_student_sampler_is_fastgens_multistep_sampler():
    teacher = Denoiser(tiny_unet(), schedule(clip_sample=True))
    method = DMD2(teacher, (999, 499))
    noise = torch.randn(3, 1, 8, 8)
    ours = method.sample(noise, generator=torch.Generator().manual_seed(1))
    reference = sample_multistep(method.student, noise, [999, 499], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, reference)
    assert method.export_spec() == ExportSpec("dmd2", "multistep", [999, 499], 0.0)


def test_clipped_student_output_still_gets_gradient():
    """x0 is clipped like the exported scheduler does, but every pixel -- clipped or not -- gets the loss's
    gradient (straight-through): an eps student read as x0 at t = 999 starts with nearly all pixels clipped."""
    teacher = Denoiser(tiny_unet(), schedule(clip_sample=True))
    method = DMD2(teacher, (999,))
    x_t = torch.randn(2, 1, 8, 8)
    raw_x0 = method.student(x_t, 999).x0
    x0 = method.student_x0(x_t, 999)
    torch.testing.assert_close(x0, raw_x0.clamp(-1, 1))
    assert (raw_x0.abs() > 1).float().mean() > 0.5  # most pixels saturate at initialisation
    out = torch.randn_like(x0)
    (x0 * out).sum().backward()
    head = method.student.model.conv_out.bias.grad  # d/d(bias) of x0 = -sqrt(1 - abar)/sqrt(abar) * sum(out)
    abar = method.schedule.alphas_cumprod[999].float()
    torch.testing.assert_close(head, -((1 - abar) / abar).sqrt() * out.sum().reshape(1), rtol=1e-4, atol=1e-3)


def _cond_batch(n=4):
    cond = Conditioning(torch.randn(n, 5, 16))
    return Batch(n, cond, Conditioning(torch.zeros(n, 5, 16)), real=torch.randn(n, 4, 8, 8), real_cond=cond)


def test_gan_term_reaches_the_generator_through_the_frozen_critic():
    teacher = Denoiser(tiny_cond_unet(), schedule())
    method = DMD2(teacher, (999,), DMD2Options(guidance_scale=2.0, gan_generator_weight=1.0, gan_critic_weight=1.0),
                  critic=CriticOptions(gan_head=True))
    critic = method.critic
    assert method.data_needs().real
    batch = _cond_batch()
    out = method(batch, 0)
    assert {"dm", "gan_g", "dsm", "gan_d"} <= set(out.logs)
    out.losses["generator"].backward()
    assert all(p.grad is None for p in critic.trainable_parameters())  # critic weights frozen in the generator step
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameter_groups()["generator"])
    assert all(p.requires_grad for p in critic.trainable_parameters())  # ... and trainable again afterwards
    out.losses["critic"].backward()
    assert all(p.grad is not None for p in critic.head.parameters())
    with pytest.raises(ValueError, match="real samples"):
        critic.loss(torch.randn(2, 4, 8, 8), batch.cond.index(slice(0, 2)))


def test_student_lora_targets_choose_the_student_adapters_layers():
    """student.lora_targets adapts exactly those layers for the student; the critic's adapter keeps the defaults."""
    net = tiny_cond_unet()
    teacher = AdapterDenoiser(net, schedule(), None)
    method = DMD2(teacher, (999,), DMD2Options(guidance_scale=2.0, ratio=1),
                  student=StudentOptions(lora_rank=2, lora_targets=["conv_in", "ff.net.2"]),
                  critic=CriticOptions(lora_rank=2))
    layers = lambda adapter: {n.split(".lora_A.")[0] for n, _ in net.named_parameters()  # noqa: E731
                              if f".lora_A.{adapter}." in n}
    student = layers("student")
    assert all(n == "conv_in" or n.endswith(".ff.net.2") for n in student)
    assert "conv_in" in student and any(n.endswith(".ff.net.2") for n in student)
    assert "conv_in" not in layers("critic") and any(n.endswith("to_q") for n in layers("critic"))
    assert method.parameter_groups()["generator"] == lora_parameters(net, "student")


def test_lora_roles_share_one_frozen_base():
    net = tiny_cond_unet()
    teacher = AdapterDenoiser(net, schedule(), None)
    # the critic's adapter is added after the student's: the student must stay trainable
    method = DMD2(teacher, (999,), DMD2Options(guidance_scale=2.0, ratio=1), student=StudentOptions(lora_rank=4),
                  critic=CriticOptions(lora_rank=4))
    student, critic = method.student, method.critic
    groups = method.parameter_groups()
    assert groups["generator"] == lora_parameters(net, "student") and all(p.requires_grad for p in groups["generator"])
    assert all(p.requires_grad for p in groups["critic"])
    base = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" not in n}
    assert not any(net.get_parameter(n).requires_grad for n in base)

    batch = _cond_batch(3)
    probe = (torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 100]), batch.cond)
    with torch.no_grad():
        teacher_before = teacher(*probe).raw
    opts = {k: torch.optim.AdamW(v, lr=1e-2) for k, v in groups.items()}
    for step in range(3):
        out = method(batch, step)
        sum(out.losses.values()).backward()
        for name in out.losses:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name
            opts[name].step()
            opts[name].zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(teacher(*probe).raw, teacher_before, rtol=0, atol=0)  # the teacher never moves
        assert (student(*probe).raw - teacher_before).abs().max() > 1e-4
        assert (critic.denoiser(*probe).raw - teacher_before).abs().max() > 1e-4
    assert all(torch.equal(net.get_parameter(n), p) for n, p in base.items())
    assert all(p.requires_grad for p in groups["generator"] + groups["critic"])  # switching never changes that


# --- SiD ----------------------------------------------------------------------------------------

def test_sid_loss_is_the_papers_formula():
    x_g, y_r, y_f = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    for alpha in (1.0, 1.2):
        w = (x_g - y_r).abs().mean(dim=(1, 2, 3))
        expected = ((y_r - y_f) * ((y_r - x_g) - alpha * (y_r - y_f))).sum(dim=(1, 2, 3)) / w
        torch.testing.assert_close(SiDLoss(alpha)(x_g, y_r, y_f), expected)
    # alpha = 1: (y_r - y_f) (y_f - x_g), as in SiD-LSG's code
    torch.testing.assert_close(SiDLoss(1.0)(x_g, y_r, y_f), ((y_r - y_f) * (y_f - x_g)).sum(dim=(1, 2, 3)) /
                               (x_g - y_r).abs().mean(dim=(1, 2, 3)))


def test_sid_gradient_flows_through_both_predictions_into_the_generator():
    """Unlike DMD, SiD differentiates through the teacher's and the critic's x0 (their weights frozen)."""
    teacher = Denoiser(tiny_unet(), schedule("sample"))
    method = SiD(teacher, (999,), SiDOptions())
    with torch.no_grad():
        method.critic.denoiser.model.conv_out.bias.add_(0.3)  # a critic that differs from the teacher
    x = method.generate(Batch(4))
    torch.manual_seed(5)
    loss, logs = method.generator_update(x, Batch(4), 0)
    (full,) = torch.autograd.grad(loss, x, retain_graph=True)
    # the same loss with both predictions detached: only the explicit x_g term
    torch.manual_seed(5)
    x_t, t = method.noised(x)
    with torch.no_grad():
        y_r, y_f = method.teacher(x_t, t).x0, method.critic.x0(x_t, t)
    (direct,) = torch.autograd.grad(method.sid_loss(x, y_r, y_f).mean(), x)
    assert (full - direct).abs().max() > 1e-3 * direct.abs().max()
    assert logs["masked_g"] == 0
    loss.backward()
    assert all(p.grad is None for p in method.critic.trainable_parameters())
    assert all(p.grad is None for n, p in teacher.model.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameter_groups()["generator"])


def test_sid_generator_update_moves_samples_towards_the_teacher():
    """Critic's x0 = teacher's x0 + d: one SiD step moves the generator's samples by about -d."""
    teacher = Denoiser(tiny_unet(), schedule("sample"))
    method = SiD(teacher, (999,), SiDOptions(alpha=1.2))
    d = 0.5
    with torch.no_grad():
        method.critic.denoiser.model.conv_out.bias.add_(d)
    z = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        before = method.student_x0(z, 999)
    opt = torch.optim.SGD(method.parameter_groups()["generator"], lr=1e-3)
    method.generator_update(method.generate(Batch(8)), Batch(8), 0)[0].backward()
    opt.step()
    with torch.no_grad():
        moved = method.student_x0(z, 999) - before
    assert moved.mean() < 0 and (moved < 0).float().mean() > 0.9


def test_sid_masks_non_finite_samples_and_counts_them(monkeypatch):
    method = SiD(Denoiser(tiny_unet(), schedule()), (999,), SiDOptions(guidance_scale=None))
    x = method.generate(Batch(4)).detach().clone()
    x[1, 0, 0, 0] = float("nan")
    loss, logs = method.generator_update(x.requires_grad_(), Batch(4), 0)
    assert torch.isfinite(loss) and logs["masked_g"] == 1
    closs, clogs = method.critic_update(x.detach(), Batch(4))
    assert torch.isfinite(closs) and clogs["masked_c"] == 1
    x_all = torch.full_like(x, float("nan"))
    assert not torch.isfinite(method.generator_update(x_all, Batch(4), 0)[0])  # a batch masked whole stops training


@pytest.mark.parametrize("mode, teacher_w, critic_train, critic_eval, critic_gets_uncond", [
    ("teacher", 3.0, None, None, False), ("lsg", 3.0, 3.0, 3.0, False), ("zero", None, None, None, True),
    ("anti", None, None, -1.0, False)])
def test_sid_guidance_variants(mode, teacher_w, critic_train, critic_eval, critic_gets_uncond, monkeypatch):
    teacher = Denoiser(tiny_cond_unet(), schedule())
    method = SiD(teacher, (999,), SiDOptions(guidance=mode), default_guidance=3.0)
    seen = []
    real_forward = Denoiser.forward

    def spy(self, x_t, t, cond=None, uncond=None, guidance_scale=None):
        role = "teacher" if self is teacher else "critic"
        seen.append((role, guidance_scale, cond is not None and cond is uncond_rows[0]))
        return real_forward(self, x_t, t, cond, uncond, guidance_scale)

    batch = _cond_batch()
    uncond_rows = [batch.uncond]
    monkeypatch.setattr(Denoiser, "forward", spy)
    x = method.generate(batch)
    seen.clear()
    method.generator_update(x, batch, 0)
    method.critic_update(x.detach(), batch)
    (t_role, t_w, _), (c_role, c_eval, c_uncond_eval), (_, c_train, c_uncond_train) = seen
    assert (t_role, c_role) == ("teacher", "critic")
    assert t_w == teacher_w and c_eval == critic_eval and c_train == critic_train
    assert c_uncond_eval == c_uncond_train == critic_gets_uncond


def test_sid_bad_options_are_one_line_errors():
    teacher = Denoiser(tiny_unet(), schedule())
    for options, message in [(SiDOptions(alpha=3.0), "alpha must be in"), (SiDOptions(guidance="more"), "guidance must be"),
                             (SiDOptions(guidance="zero", guidance_scale=2.0), "uses no guidance scale"),
                             (SiDOptions(guidance="lsg"), "needs a text-conditional teacher"),
                             (SiDOptions(ratio=0), "ratio must be")]:
        with pytest.raises(ValueError, match=message):
            SiD(teacher, (999,), options)
    with pytest.raises(ValueError, match="trains a GAN head only with sid.gan_generator_weight"):  # tests/test_sida.py
        SiD(teacher, (999,), critic=CriticOptions(gan_head=True))
    learned_variance = tiny_unet()
    learned_variance = type(learned_variance)(**{**learned_variance.config, "out_channels": 2})
    with pytest.raises(ValueError, match="learned variance"):
        SiD(Denoiser(learned_variance, schedule()), (999,))


def test_few_step_sid_trains_a_random_step_after_a_no_grad_rollout():
    method = SiD(Denoiser(tiny_unet(), schedule()), (749, 499, 249), SiDOptions(guidance_scale=None))
    steps = []
    hook = method.student.model.register_forward_pre_hook(
        lambda module, args: steps.append((torch.is_grad_enabled(), int(args[1][0]))))
    drawn = set()
    for i in range(12):
        steps.clear()
        out = method(Batch(2), i)
        assert set(out.losses) == {"generator", "critic"} and {"sid", "dsm"} <= set(out.logs)
        generator_calls = steps[:len(steps)]
        assert [g for g, _ in generator_calls] == [False] * (len(generator_calls) - 1) + [True]
        drawn.add(len(generator_calls) - 1)
    hook.remove()
    assert drawn == {0, 1, 2}  # every step k is trained
