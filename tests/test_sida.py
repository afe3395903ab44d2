"""SiDA: SiD with the critic's GAN head on real images (fastgen/methods/sid.py, the shared pieces in
fastgen/methods/distribution_matching.py and fastgen/critic.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_resumes_exactly, tiny_cond_unet, tiny_recipe, tiny_unet
from test_methods import _cond_batch, schedule

from fastgen.critic import CriticOptions
from fastgen.denoiser import Denoiser
from fastgen.methods import Batch
from fastgen.methods.sid import SiD, SiDLoss, SiDOptions

GAN = dict(gan_generator_weight=1e-2, gan_critic_weight=1.0)


def sida(teacher=None, guidance="teacher", t_range=(0.0, 1.0), **options):
    teacher = teacher or Denoiser(tiny_cond_unet(), schedule())
    return SiD(teacher, (999,), SiDOptions(guidance=guidance, **{**GAN, **options}),
               critic=CriticOptions(gan_head=True, t_min=t_range[0], t_max=t_range[1]),
               default_guidance=3.0 if teacher.is_conditional else None)


def count_critic_calls(method):
    calls = []
    hook = method.critic.denoiser.model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls, hook


def test_sida_generator_loss_is_sid_plus_the_weighted_gan_term_through_the_frozen_critic():
    """L = L_SiD + lambda_G CHW mean_B(softplus(-D(x_t))) mean_i(1 / w_i), D from the same critic call as y_f;
    the GAN term changes the generator's gradient, which reaches x_g through the critic's input only."""
    method, batch = sida(), _cond_batch()
    x = method.generate(batch)
    calls, hook = count_critic_calls(method)
    torch.manual_seed(5)
    loss, logs = method.generator_update(x, batch, 0)
    hook.remove()
    assert calls == [4]  # one critic call gives the critic's x0 and the GAN logits
    torch.manual_seed(5)
    x_t, t = method.noised(x)
    with torch.no_grad():
        y_r = method.x0_real(x_t, t, batch)
        pred, logits = method.critic(x_t, t, batch.cond, features=True)
        w = SiDLoss.normaliser(x, y_r)
    torch.testing.assert_close(logs["sid"], method.sid_loss(x, y_r, pred.x0).mean())
    torch.testing.assert_close(logs["gan_g"], F.softplus(-logits).mean())
    gan = F.softplus(-logits).mean() * x[0].numel() * (1 / w).mean()
    torch.testing.assert_close(loss, logs["sid"] + 1e-2 * gan)

    (with_gan,) = torch.autograd.grad(loss, x, retain_graph=True)
    (sid_only,) = torch.autograd.grad(logs["sid"], x, retain_graph=True)
    assert (with_gan - sid_only).abs().max() > 1e-3 * sid_only.abs().max()  # the GAN term moves the generator
    loss.backward()
    critic = method.critic.trainable_parameters()
    assert all(p.grad is None for p in critic) and all(p.requires_grad for p in critic)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameter_groups()["generator"])


def test_sida_under_anti_cfg_takes_the_gan_features_in_a_second_unguided_call():
    method, batch = sida(guidance="anti"), _cond_batch()
    calls, hook = count_critic_calls(method)
    loss, logs = method.generator_update(method.generate(batch), batch, 0)
    hook.remove()
    assert calls == [8, 4]  # guided x0 (cond + uncond rows), then the unguided GAN features
    assert torch.isfinite(loss) and "gan_g" in logs


def test_sida_discriminator_separates_real_from_fake_on_a_fixed_batch():
    """The critic's update with the GAN head lowers the discriminator loss on one fixed batch of generated
    and real samples, and D then scores the real ones above the generated ones."""
    torch.manual_seed(0)
    method = sida(Denoiser(tiny_unet(), schedule()), t_range=(0.0, 0.2))
    with torch.no_grad():
        fake = method.generate(Batch(8))
    real = torch.rand(8, 1, 8, 8).round() * 2 - 1  # binary images; the untrained generator's are large and noisy
    batch = Batch(8, real=real)
    opt = torch.optim.Adam(method.critic.trainable_parameters(), lr=1e-2)

    def fixed():
        torch.manual_seed(9)
        with torch.no_grad():
            return method.critic_update(fake, batch)[1]

    before = fixed()
    for _ in range(40):
        opt.zero_grad()
        loss, logs = method.critic_update(fake, batch)
        loss.backward()
        opt.step()
    after = fixed()
    assert after["gan_d"] < 0.8 * before["gan_d"], (before["gan_d"], after["gan_d"])  # 1.40 -> 1.02
    t = torch.full((8,), 50)
    with torch.no_grad():
        d_fake = method.critic(method.schedule.add_noise(fake, torch.randn_like(fake), t), t, features=True)[1]
        d_real = method.critic(method.schedule.add_noise(real, torch.randn_like(real), t), t, features=True)[1]
    assert d_real.min() > d_fake.max()


def test_sida_masks_non_finite_samples_in_both_losses():
    method, batch = sida(), _cond_batch()
    x = method.generate(batch).detach().clone()
    x[1, 0, 0, 0] = float("nan")
    loss, logs = method.generator_update(x.requires_grad_(), batch, 0)
    assert torch.isfinite(loss) and logs["masked_g"] == 1 and torch.isfinite(logs["gan_g"])
    closs, clogs = method.critic_update(x.detach(), batch)
    assert torch.isfinite(closs) and clogs["masked_c"] == 1 and torch.isfinite(clogs["gan_d"])
    assert not torch.isfinite(method.critic_update(torch.full_like(x, float("nan")), batch)[0])


def test_sid_without_the_gan_is_data_free_and_logs_no_gan_terms():
    method = SiD(Denoiser(tiny_unet(), schedule()), (999,), SiDOptions(guidance_scale=None))
    assert method.critic.head is None and not method.data_needs().real
    out = method(Batch(4), 0)
    assert set(out.logs) == {"sid", "masked_g", "dsm", "masked_c"}
    needs = sida().data_needs()
    assert needs.real and needs.why_real == "sid's GAN loss (critic.gan_head with sid.gan_*_weight > 0)"
    assert "critic.gan_head = false (data-free SiD)" in needs.without_real


def test_sida_bad_options_are_one_line_errors():
    teacher = Denoiser(tiny_cond_unet(), schedule())
    with pytest.raises(ValueError, match="sid.gan_generator_weight / gan_critic_weight need the critic's GAN head"):
        SiD(teacher, (999,), SiDOptions(gan_critic_weight=0.1))
    with pytest.raises(ValueError, match="trains a GAN head only with sid.gan_generator_weight or sid.gan_critic_w"):
        SiD(teacher, (999,), critic=CriticOptions(gan_head=True))
    with pytest.raises(ValueError, match="must be >= 0"):
        SiD(teacher, (999,), SiDOptions(gan_generator_weight=-1.0))
    with pytest.raises(ValueError, match="sid.guidance = 'lsg' trains the critic with guidance"):
        sida(teacher, guidance="lsg")


def test_sida_run_resumes_exactly_with_the_gan_head(tmp_path):
    """A SiDA run on the digits teacher and its zoo images, killed and resumed, ends as the uninterrupted one
    (the GAN head included)."""
    recipe = tiny_recipe(tmp_path / "sida.toml", ratio=None, ema_decay=0.5, steps=4, checkpoint_every=2)
    overrides = ["method=sid", "critic.gan_head=true", "sid.gan_generator_weight=0.01", "sid.gan_critic_weight=0.1",
                 "data.real=zoo", "data.max_real_images=64"]
    whole = assert_resumes_exactly(SiD, recipe, "digits-ddpm", tmp_path, stops=(3,), overrides=overrides)
    from safetensors.torch import load_file
    from fastgen.train.trainer import latest_checkpoint

    state = load_file(str(latest_checkpoint(whole / "checkpoints") / "model.safetensors"))
    assert any(".head." in k for k in state)
