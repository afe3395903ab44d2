"""Numerics of fastgen's schedules and denoiser against diffusers' own schedulers."""

import pytest
import torch
from conftest import tiny_cond_unet, tiny_sd3_transformer, tiny_unet
from diffusers import (DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler,
                       PNDMScheduler)

from fastgen.denoiser import Conditioning, Denoiser
from fastgen.schedule import FlowSchedule, VPSchedule, schedule_from_scheduler_config
from fastgen.pipelines.sampler import sample_ddim, sample_multistep

BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
VP_TYPES = ["epsilon", "sample", "v_prediction"]


@pytest.mark.parametrize("beta_schedule", BETAS)
def test_add_noise_matches_diffusers(beta_schedule):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule)
    schedule = VPSchedule.from_scheduler_config(scheduler.config)
    x0, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=0)


def test_flow_add_noise_matches_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowSchedule.from_scheduler_config(scheduler.config)
    scheduler.set_timesteps(8)
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = scheduler.timesteps[3]
    expected = scheduler.scale_noise(x0, t.reshape(1), noise)
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow"])
@pytest.mark.parametrize("dst", ["epsilon", "sample", "v_prediction", "flow"])
def test_conversions_round_trip(kind, dst):
    schedule = FlowSchedule(shift=2.0) if kind == "flow" else VPSchedule.from_scheduler_config(
        DDPMScheduler(prediction_type=kind).config)
    t = torch.tensor([1, 250, 600, 999])
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    x_t = schedule.add_noise(x0, eps, t)
    pred = schedule.from_x0_eps(x0, eps, t)
    back_x0, back_eps = schedule.to_x0_eps(pred, x_t, t)
    torch.testing.assert_close(back_x0, x0, atol=2e-3, rtol=1e-3)  # t=1 divides by a tiny sigma
    torch.testing.assert_close(back_eps, eps, atol=2e-3, rtol=1e-3)
    other = schedule.convert(pred, x_t, t, dst=dst)
    torch.testing.assert_close(schedule.convert(other, x_t, t, src=dst, dst=kind), pred, atol=2e-3, rtol=1e-3)


def test_v_prediction_matches_diffusers_velocity():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    schedule = VPSchedule.from_scheduler_config(scheduler.config)
    x0, eps, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([5, 400, 990])
    torch.testing.assert_close(schedule.from_x0_eps(x0, eps, t), scheduler.get_velocity(x0, eps, t), atol=1e-5, rtol=0)


def test_schedule_from_any_ddpm_family_config():
    for cls in (DDIMScheduler, PNDMScheduler, LCMScheduler):
        sched = cls(beta_schedule="scaled_linear")
        schedule = schedule_from_scheduler_config(sched.config)
        assert isinstance(schedule, VPSchedule)
        torch.testing.assert_close(schedule.alphas_cumprod.float(), sched.alphas_cumprod.float())
    assert isinstance(schedule_from_scheduler_config(FlowMatchEulerDiscreteScheduler().config), FlowSchedule)


def test_bad_timesteps_raise():
    schedule = VPSchedule.from_scheduler_config(DDPMScheduler().config)
    with pytest.raises(ValueError, match="out of range|must lie"):
        schedule.alpha_sigma(1000)
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.to_x0_eps(torch.zeros(1), torch.zeros(1), 0, "bogus")


@pytest.mark.parametrize("prediction_type", VP_TYPES)
@pytest.mark.parametrize("beta_schedule", BETAS)
def test_ddim_step_matches_diffusers(prediction_type, beta_schedule):
    scheduler = DDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing")
    scheduler.set_timesteps(4)
    denoiser = Denoiser(tiny_unet(), VPSchedule.from_scheduler_config(scheduler.config))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            pred = denoiser(x, t)
            t_prev = int(t) - 1000 // 4
            ours = denoiser.schedule.add_noise(pred.x0, pred.eps, t_prev)  # t_prev = -1: final alpha
            expected = scheduler.step(pred.raw, t, x).prev_sample
            # squaredcos_cap_v2 has alpha_999 ~ 1e-4: x0 reaches 1e4 and float32 rounding is relative
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
            x = expected


@pytest.mark.parametrize("prediction_type", VP_TYPES)
def test_lcm_step_matches_diffusers(prediction_type):
    """One x0-then-renoise step of fastgen's sampler equals LCMScheduler.step with the same generator."""
    scheduler = LCMScheduler(prediction_type=prediction_type, original_inference_steps=4)
    scheduler.set_timesteps(4)
    denoiser = Denoiser(tiny_unet(), VPSchedule.from_scheduler_config(scheduler.config))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for i in range(3):
            t, t_next = int(scheduler.timesteps[i]), int(scheduler.timesteps[i + 1])
            x0 = denoiser(x, t).x0
            z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
            ours = denoiser.schedule.add_noise(x0, z, t_next)
            expected = scheduler.step(denoiser(x, t).raw, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
            x = expected


def test_multistep_sampler_matches_lcm_scheduler_loop():
    scheduler = LCMScheduler(original_inference_steps=4, clip_sample=True)
    scheduler.set_timesteps(4)
    denoiser = Denoiser(tiny_unet(), VPSchedule.from_scheduler_config(scheduler.config))
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ours = sample_multistep(denoiser, noise, scheduler.timesteps.tolist(), generator=torch.Generator().manual_seed(3))
        gen, x = torch.Generator().manual_seed(3), noise
        for t in scheduler.timesteps:
            x = scheduler.step(denoiser.model(x, t).sample, t, x, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)


def test_ddim_sampler_matches_ddim_scheduler_loop():
    scheduler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(4)  # DDIMScheduler steps to t - T // N, so N must divide T to match
    denoiser = Denoiser(tiny_unet(), VPSchedule.from_scheduler_config(scheduler.config))
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ours = sample_ddim(denoiser, noise, scheduler.timesteps.tolist())
        x = noise
        for t in scheduler.timesteps:
            x = scheduler.step(denoiser.model(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_euler_step_matches_diffusers(stochastic):
    """A flow Euler step (= DDIM for flow) through the SD3 denoiser equals FlowMatchEulerDiscreteScheduler.step."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    scheduler.set_timesteps(4)
    denoiser = Denoiser(tiny_sd3_transformer(), FlowSchedule.from_scheduler_config(scheduler.config))
    cond = Conditioning(torch.randn(2, 5, 16), torch.randn(2, 16))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            pred = denoiser(x, t, cond)
            t_next = scheduler.sigmas[i + 1] * 1000
            if stochastic:
                z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
                ours = denoiser.schedule.add_noise(pred.x0, z, t_next)
            else:
                ours = denoiser.schedule.add_noise(pred.x0, pred.eps, t_next)
            expected = scheduler.step(pred.raw, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
            x = expected


def test_guidance_and_conditioning():
    unet = tiny_cond_unet()
    denoiser = Denoiser(unet, VPSchedule.from_scheduler_config(DDPMScheduler().config))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    cond, uncond = Conditioning(torch.randn(2, 3, 16)), Conditioning(torch.zeros(2, 3, 16))
    with torch.no_grad():
        c = unet(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        u = unet(x, t, encoder_hidden_states=uncond.encoder_hidden_states).sample
        guided = denoiser(x, 500, cond, uncond, guidance_scale=3.0)
        torch.testing.assert_close(guided.raw, u + 3.0 * (c - u), atol=1e-5, rtol=0)
        # guidance on eps and on x0 are equivalent for a fixed x_t
        torch.testing.assert_close(guided.x0, denoiser(x, t, uncond).x0 + 3.0 * (
            denoiser(x, t, cond).x0 - denoiser(x, t, uncond).x0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="uncond"):
        denoiser(x, t, cond, None, guidance_scale=2.0)


def test_timestep_cond_is_passed():
    unet = tiny_cond_unet(time_cond_proj_dim=8)
    denoiser = Denoiser(unet, VPSchedule.from_scheduler_config(DDPMScheduler().config))
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    w1, w7 = torch.randn(1, 8), torch.randn(1, 8)
    with torch.no_grad():
        a = denoiser(x, 300, Conditioning(emb, timestep_cond=w1)).raw
        b = denoiser(x, 300, Conditioning(emb, timestep_cond=w7)).raw
        ref = unet(x, torch.tensor([300]), encoder_hidden_states=emb, timestep_cond=w7).sample
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, ref)


def test_feature_hook_captures_bottleneck_and_is_removed():
    for model, args in [(tiny_unet(), ()), (tiny_sd3_transformer(), (Conditioning(torch.randn(1, 5, 16), torch.randn(1, 16)),))]:
        schedule = FlowSchedule() if args else VPSchedule.from_scheduler_config(DDPMScheduler().config)
        denoiser = Denoiser(model, schedule)
        x = torch.randn(1, model.config.in_channels, 8, 8)
        with torch.no_grad(), denoiser.capture_features() as feats:
            denoiser(x, 500, *args)
            denoiser(x, 100, *args)
        assert len(feats) == 2 and feats[0].shape[0] == 1 and not torch.equal(feats[0], feats[1])
        with torch.no_grad():
            denoiser(x, 500, *args)
        assert len(feats) == 2  # the hook is gone


def test_wrong_model_type_is_rejected():
    with pytest.raises(TypeError, match="UNet2DModel"):
        Denoiser(torch.nn.Linear(2, 2), FlowSchedule())
