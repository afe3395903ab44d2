"""Consistency distillation, LCM and LCM-LoRA: the boundary condition, the loss, resume with the EMA target network,
and exports that plain diffusers runs as fastgen does (LCM-LoRA also through the teacher's own pipeline)."""

import json

import pytest
import torch
from conftest import assert_resumes_exactly, fixed_batch_losses
from diffusers import DiffusionPipeline, LCMScheduler, TCDScheduler
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from fastgen import zoo
from fastgen.lora import AdapterDenoiser
from fastgen.methods import StudentOptions
from fastgen.denoiser import Denoiser
from fastgen.methods.common import boundary_scalings, consistency_function, ddim_step, heun_step
from fastgen.methods.consistency import (ConsistencyDistillation, ConsistencyOptions, LatentConsistency,
                                         LatentConsistencyOptions, consistency_grid)
from fastgen.pipelines import FewStepPipeline
from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import encode_prompts
from fastgen.schedule import VPSchedule, schedule_from_scheduler_config
from fastgen.train.recipes import RecipeError, load_recipe
from fastgen.train.runner import export

PROMPTS = ["a photo of a bag", "a photo of a sneaker"]


@pytest.fixture(scope="module")
def pipes():
    return {name: DiffusionPipeline.from_pretrained(zoo.path(name)) for name in ("digits-ddpm", "fmnist-ldm")}


def method_on(pipe, cls, steps=4, lora_rank=0, **options):
    teacher = AdapterDenoiser(pipe.unet, schedule_from_scheduler_config(pipe.scheduler.config), None)
    opts = (LatentConsistencyOptions if cls is LatentConsistency else ConsistencyOptions)(**options)
    student = StudentOptions(num_steps=steps, lora_rank=lora_rank)
    timesteps = cls.recipe_timesteps(1000, opts, student)
    return cls(teacher, timesteps, opts, student, default_guidance=2.0 if teacher.is_conditional else None)


def perturb(method, scale=0.02):
    with torch.no_grad():
        for name, p in method.student.model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def test_boundary_condition_is_lcm_schedulers():
    scheduler = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor([t]), 10.0)
        want = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        torch.testing.assert_close((c_skip[0], c_out[0]), tuple(torch.as_tensor(w).float() for w in want))
    assert consistency_grid(1000, 20)[:3] == [19, 39, 59] and consistency_grid(1000, 20)[-1] == 999


def test_the_consistency_function_is_the_identity_at_t_0(pipes):
    method = method_on(pipes["digits-ddpm"], ConsistencyDistillation)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(consistency_function(method.student, x, torch.zeros(2, dtype=torch.long)), x)


def test_heuns_step_is_closer_than_ddims_to_the_fine_ode_solve(pipes):
    """The teacher's step t -> t - 20 (the CD grid's): Heun's lands about 3x closer than DDIM's to the finest DDIM
    solve of the same ODE (one step per teacher timestep: 20 steps), at t from 999 down to 19, for every sample.
    The ODE without clip_sample (digits-ddpm clips x0, which no ODE solver's order changes)."""
    pipe = pipes["digits-ddpm"]
    schedule = schedule_from_scheduler_config(pipe.scheduler.config)
    teacher = Denoiser(pipe.unet, VPSchedule(schedule.alphas_cumprod, "epsilon"))
    t = torch.tensor([999, 899, 699, 499, 299, 199, 99, 19])
    x_t = teacher.schedule.add_noise(torch.rand(8, 1, 8, 8) * 2 - 1, torch.randn(8, 1, 8, 8), t)
    with torch.no_grad():
        fine = x_t
        for j in range(20):
            fine = ddim_step(teacher, fine, (t - j).clamp_min(0), (t - j - 1).clamp_min(0))
        ddim, heun = (step(teacher, x_t, t, (t - 20).clamp_min(0)) for step in (ddim_step, heun_step))
    err_ddim, err_heun = ((x - fine).flatten(1).pow(2).mean(1).sqrt() for x in (ddim, heun))
    assert torch.all(err_heun < err_ddim) and err_ddim.mean() > 2 * err_heun.mean()
    with pytest.raises(ValueError, match="t_next >= 0"):
        heun_step(teacher, x_t, t, t - 20)


@pytest.mark.parametrize("kind", ["cd", "cd-heun", "lcm", "lcm-lora"])
def test_loss_on_a_fixed_batch_decreases(pipes, kind):
    if kind.startswith("cd"):
        method = method_on(pipes["digits-ddpm"], ConsistencyDistillation, loss="huber", huber_c=0.004,
                           solver="heun" if kind == "cd-heun" else "ddim")
        lr = 2e-5  # Adam's first steps move every weight by ~lr: larger ones first raise a consistency loss
    else:
        lora = kind == "lcm-lora"
        method = method_on(pipes["fmnist-ldm"], LatentConsistency, lora_rank=4 if lora else 0, guidance_min=1.0,
                           guidance_max=4.0, guidance_embedding=not lora, target_decay=0.0 if lora else 0.95)
        lr = 2e-3 if lora else 2e-5
    # the same draws in training too: the target network moves, the batch does not
    text_pipe = None if kind.startswith("cd") else pipes["fmnist-ldm"]
    before, after = fixed_batch_losses(method, text_pipe, lr, same_draws=True)
    assert after < 0.6 * before


def recipe_file(tmp_path, method, teacher, section):
    path = tmp_path / f"{method}.toml"
    path.write_text(f"""method = "{method}"
teacher = "{teacher}"
[student]
num_steps = 2
[{method}]
{section}
[optim.generator]
lr = 1e-3
warmup_steps = 0
[data]
real = "zoo"
max_real_images = 32
[train]
steps = 5
batch_size = 4
checkpoint_every = 1
log_every = 1
progress = false
""")
    return path


@pytest.mark.parametrize("method", ["cd", "cd-heun", "lcm"])
def test_resume_with_the_ema_target_is_exact(tmp_path, method):
    torch.set_num_threads(1)
    if method.startswith("cd"):
        solver = "heun" if method == "cd-heun" else "ddim"
        recipe = recipe_file(tmp_path, "cd", "digits-ddpm", f"target_decay = 0.9\nsolver = \"{solver}\"")
        teacher, cls = "digits-ddpm", ConsistencyDistillation
    else:
        recipe = recipe_file(tmp_path, "lcm", "fmnist-ldm", "guidance_min = 1.0\nguidance_max = 3.0\ntarget_decay = 0.9")
        teacher, cls = "fmnist-ldm", LatentConsistency
    whole = assert_resumes_exactly(cls, recipe, teacher, tmp_path, stops=(2, 4))
    final = load_file(str(whole / "checkpoints" / "checkpoint-0000005" / "model.safetensors"))
    name = next(k for k in final if k.startswith("target.model.") and k.endswith("conv_in.weight"))
    online = final[name.replace("target.", "student.")]
    assert not torch.equal(final[name], online)  # a target that lags the student ...
    teacher_pipe = DiffusionPipeline.from_pretrained(zoo.path(teacher))
    assert not torch.equal(final[name], teacher_pipe.unet.conv_in.weight)  # ... and follows it
    assert read_metadata(whole / "student")["call"].startswith("num_inference_steps=2")


def test_cd_export_is_the_methods_multistep_consistency_sampler(pipes, tmp_path):
    pipe = pipes["digits-ddpm"]
    method = method_on(pipe, ConsistencyDistillation, steps=2, timestep_scaling=0.02)  # a visible boundary term
    perturb(method)
    folder = export(method, pipe, tmp_path / "cd")
    student = DiffusionPipeline.from_pretrained(folder)
    config = student.scheduler.config
    assert type(student.scheduler).__name__ == "LCMScheduler" and config.timestep_scaling == 0.02
    assert config.original_inference_steps == 50 and read_metadata(folder)["timesteps"] == [999, 499]
    got = torch.from_numpy(student(batch_size=3, num_inference_steps=2, output_type="np",
                                   generator=torch.Generator().manual_seed(4)).images).permute(0, 3, 1, 2)
    gen = torch.Generator().manual_seed(4)
    want = (method.sample(randn_tensor((3, 1, 8, 8), generator=gen), generator=gen) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_lcm_export_plain_call_at_two_guidance_scales(pipes, tmp_path):
    pipe = pipes["fmnist-ldm"]
    method = method_on(pipe, LatentConsistency, guidance_min=1.0, guidance_max=5.0)
    perturb(method)
    folder = export(method, pipe, tmp_path / "lcm")
    assert read_metadata(folder)["call"] == "num_inference_steps=4, guidance_scale=2.0"
    student = DiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        cond = encode_prompts(pipe, PROMPTS)[0]
    for w in (1.5, 4.0):
        got = student(PROMPTS, num_inference_steps=4, guidance_scale=w, output_type="latent",
                      generator=torch.Generator().manual_seed(5)).images
        gen = torch.Generator().manual_seed(5)
        want = method.sample(randn_tensor((2, 4, 8, 8), generator=gen), cond, gen, guidance_scale=w)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_tcd_sampling_equals_diffusers_tcd_scheduler(pipes, tmp_path):
    """FewStepPipeline(gamma=G) -- fastgen's sample_tcd -- gives the exported folder's images with its scheduler
    swapped for TCDScheduler: the LCM student at two gammas and guidance scales (StableDiffusionPipeline, eta=G),
    the CD student through ConsistencyModelPipeline (which passes no eta: TCDScheduler's default 0.3)."""
    lcm = method_on(pipes["fmnist-ldm"], LatentConsistency, guidance_min=1.0, guidance_max=5.0)
    cd = method_on(pipes["digits-ddpm"], ConsistencyDistillation, steps=2)
    for method in (lcm, cd):
        perturb(method)
    folders = {"lcm": export(lcm, pipes["fmnist-ldm"], tmp_path / "lcm"), "cd": export(cd, pipes["digits-ddpm"],
                                                                                        tmp_path / "cd")}
    plain = {name: DiffusionPipeline.from_pretrained(folder) for name, folder in folders.items()}
    for pipe in plain.values():
        pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    ours = {name: FewStepPipeline.from_pretrained(folder) for name, folder in folders.items()}
    for gamma, w, steps in ((0.3, 1.5, 4), (0.0, 4.0, 4), (0.7, 2.0, 3)):
        got = plain["lcm"](PROMPTS, num_inference_steps=steps, guidance_scale=w, eta=gamma, output_type="latent",
                           generator=torch.Generator().manual_seed(7)).images
        want = ours["lcm"](PROMPTS, num_inference_steps=steps, guidance_scale=w, gamma=gamma, output_type="latent",
                           generator=torch.Generator().manual_seed(7)).images
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got = plain["cd"](batch_size=3, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(8))
    want = ours["cd"](batch_size=3, num_inference_steps=2, gamma=0.3, output_type="pt",
                      generator=torch.Generator().manual_seed(8)).images
    torch.testing.assert_close(got.images, want, atol=1e-5, rtol=0)
    multistep = ours["cd"](batch_size=3, num_inference_steps=2, output_type="pt",
                           generator=torch.Generator().manual_seed(8)).images
    assert (multistep - want).abs().max() > 1e-3  # TCD is another sampler
    with pytest.raises(ValueError, match=r"gamma \(TCD's stochasticity\) must be a number in \[0, 1\]"):
        ours["cd"](batch_size=1, gamma=1.5)
    cards = {name: (folder / "README.md").read_text() for name, folder in folders.items()}
    assert all("pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)" in card for card in cards.values())
    assert "guidance_scale=2.0, eta=0.3, generator" in cards["lcm"] and "default gamma 0.3" in cards["cd"]


def test_lcm_lora_loads_into_the_teachers_pipeline(tmp_path):
    """The LoRA file on the teacher's own pipeline with a plain LCMScheduler, and the fused folder, both give
    fastgen's samples."""
    pipe = DiffusionPipeline.from_pretrained(zoo.path("fmnist-ldm"))
    method = method_on(pipe, LatentConsistency, lora_rank=4, guidance_min=2.0, guidance_max=2.0,
                       guidance_embedding=False, target_decay=0.0)
    perturb(method, 0.05)
    fused = export(method, pipe, tmp_path / "fused", lora_folder=tmp_path / "lora")
    with torch.no_grad():
        cond = encode_prompts(pipe, PROMPTS)[0]
    gen = torch.Generator().manual_seed(6)
    want = method.sample(randn_tensor((2, 4, 8, 8), generator=gen), cond, gen)
    teacher = DiffusionPipeline.from_pretrained(zoo.path("fmnist-ldm"))
    with torch.no_grad():
        plain = teacher(PROMPTS, num_inference_steps=4, guidance_scale=0.0, output_type="latent",
                        generator=torch.Generator().manual_seed(6)).images
    teacher.load_lora_weights(str(tmp_path / "lora"))
    teacher.scheduler = LCMScheduler.from_config(teacher.scheduler.config)
    for folder_pipe in (teacher, DiffusionPipeline.from_pretrained(fused)):
        got = folder_pipe(PROMPTS, num_inference_steps=4, guidance_scale=0.0, output_type="latent",
                          generator=torch.Generator().manual_seed(6)).images
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (plain - want).abs().max() > 1e-2  # the adapter really changes the teacher


@pytest.mark.parametrize("recipe, setting, message", [
    ("lcm_lora_fmnist", "lcm.guidance_embedding=true", "lcm.guidance_embedding = true needs a full-weight student"),
    ("lcm_lora_fmnist", "lcm.target_decay=0.95", "a LoRA student trains without a target network"),
    ("lcm_fmnist", "lcm.loss='l1'", "loss must be one of l2, huber"),
    ("cd_digits", "cd.skip=0", "skip must be >= 1"),
    ("cd_digits", "cd.solver='rk4'", "solver must be one of ddim, heun, not 'rk4'"),
])
def test_recipe_errors(recipe, setting, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, [setting])


def test_exported_metadata_of_the_shipped_recipes():
    for name in ("cd_digits", "lcm_fmnist", "lcm_lora_fmnist"):
        recipe = load_recipe(name)
        timesteps = recipe.method_class.recipe_timesteps(1000, recipe.options, recipe.student)
        assert timesteps == ([999, 499] if name == "cd_digits" else [999, 759, 499, 259])
    assert json.dumps(load_recipe("lcm_fmnist").to_dict())  # a resolved recipe.json
