"""Progressive distillation: the target, the rounds, resume across a round boundary, and every round's export."""

import json

import pytest
import torch
from conftest import assert_resumes_exactly, fixed_batch_losses
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from fastgen import zoo
from fastgen.lora import AdapterDenoiser
from fastgen.methods import Batch, OptimizerOptions, StudentOptions
from fastgen.methods.common import ddim_step
from fastgen.methods.progressive import ProgressiveDistillation, ProgressiveOptions, ddim_grid, halvings
from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import encode_prompts
from fastgen.schedule import schedule_from_scheduler_config
from fastgen.train.recipes import RecipeError, load_recipe
from fastgen.train.runner import export


@pytest.fixture(scope="module")
def pipes():
    return {name: DiffusionPipeline.from_pretrained(zoo.path(name)) for name in ("digits-ddpm", "fmnist-ldm")}


def method_on(pipe, steps=1, **options):
    teacher = AdapterDenoiser(pipe.unet, schedule_from_scheduler_config(pipe.scheduler.config), None)
    opts = ProgressiveOptions(**options)
    grid = ddim_grid(1000, opts.teacher_steps, steps)
    return ProgressiveDistillation(teacher, grid, opts, StudentOptions(num_steps=steps), default_guidance=2.0)


def test_grids_nest_and_halve():
    assert ddim_grid(1000, 64, 4) == [959, 719, 479, 239] and ddim_grid(1000, 8, 4) == [999, 749, 499, 249]
    assert set(ddim_grid(1000, 64, 8)) >= set(ddim_grid(1000, 64, 4))
    assert ddim_grid(1000, 6, 3) == [995, 663, 331]  # 3 does not divide 1000: the grid of T' = 996
    assert halvings(64, 1) == 6 and halvings(64, 4) == 4 and halvings(48, 5) is None and halvings(4, 4) is None


def test_rounds_split_the_steps(pipes):
    method = method_on(pipes["digits-ddpm"], steps=1, teacher_steps=4, first_round_weight=2.0)
    assert method.round_steps == [4, 2, 1] and method.rounds(90) == [45, 22, 23]
    with pytest.raises(ValueError, match="train.steps = 2 is fewer than progressive's 3 rounds"):
        method.rounds(2)
    # a teacher already in the student's parameterisation: no converting round, the weight does not apply
    pipe = pipes["digits-ddpm"]
    schedule = schedule_from_scheduler_config(pipe.scheduler.config).with_prediction_type("v_prediction")
    v_teacher = AdapterDenoiser(pipe.unet, schedule, None)
    opts = ProgressiveOptions(teacher_steps=4, first_round_weight=2.0)
    halving = ProgressiveDistillation(v_teacher, ddim_grid(1000, 4, 1), opts, StudentOptions(num_steps=1))
    assert halving.round_steps == [2, 1] and halving.teacher_substeps == [2, 2] and halving.rounds(90) == [45, 45]


def test_one_student_step_lands_where_two_teacher_steps_land(pipes):
    """The target x~: a DDIM step of a student predicting x~ from x_t reaches the teacher's two-step x''."""
    method = method_on(pipes["digits-ddpm"], steps=2, teacher_steps=4, prediction_type="sample")
    assert method.round_steps == [4, 2] and method.teacher_substeps == [1, 2]  # eps teacher: a first round to x0
    method.round.fill_(1)
    method.round_teacher.model.load_state_dict(method.student.model.state_dict())
    torch.manual_seed(0)
    x_t = torch.randn(3, 1, 8, 8)
    t = torch.tensor([999, 499, 499])
    batch = Batch(3)
    with torch.no_grad():
        target = method.target(x_t, t, batch, None)
        one = ddim_step(method.round_teacher, x_t, t, t - 250, eps_from_x0=True)
        two = ddim_step(method.round_teacher, one, t - 250, t - 500, eps_from_x0=True)
    a, s = method.schedule.alpha_sigma(t - 500)
    a_t, s_t = method.schedule.alpha_sigma(t)
    eps = (x_t - a_t.view(-1, 1, 1, 1) * target) / s_t.view(-1, 1, 1, 1)  # the student's eps, implied by its x0
    landed = a.view(-1, 1, 1, 1) * target + s.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(landed[:1], two[:1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target[1:], two[1:], atol=0, rtol=0)  # the last step: the teacher's x0 itself


def test_the_converting_rounds_target_is_the_teachers_clipped_x0(pipes):
    """One teacher step per student step: x~ is the teacher's x0 (clipped, as digits-ddpm clips), also near t = T,
    where a_t'' - (s_t''/s_t) a_t is ~1e-3 and the teacher's unclipped x0 is out of range."""
    method = method_on(pipes["digits-ddpm"], steps=1, teacher_steps=64)
    assert method.teacher_substeps[0] == 1 and int(method.round) == 0
    torch.manual_seed(0)
    x_t = torch.randn(4, 1, 8, 8)
    t = torch.tensor([959, 944, 479, 14])
    with torch.no_grad():
        target = method.target(x_t, t, Batch(4), None)
        x0 = method.teacher(x_t, t).x0
    assert x0.abs().max() > 2  # the clip is active
    torch.testing.assert_close(target, x0.clamp(-1, 1), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", ["digits-ddpm", "fmnist-ldm"])
def test_loss_on_a_fixed_batch_decreases(pipes, name):
    guided = name == "fmnist-ldm"
    pipe = pipes[name]
    method = method_on(pipe, steps=4, teacher_steps=8, **({"guidance_min": 1.0, "guidance_max": 3.0} if guided else {}))
    assert method.round_steps == [8, 4]
    method.begin_round(1)  # a halving round, with the first round's student as the teacher
    before, after = fixed_batch_losses(method, pipe if guided else None)
    assert after < 0.6 * before


def test_the_loss_weightings(pipes):
    """On a 1-step round (one timestep, near T: SNR < 1) the paper's max(SNR, 1) is the x0 error itself and the
    epsilon weighting is SNR_t times it, on the same draws."""
    losses = {}
    for weighting in ("truncated_snr", "x0", "eps"):
        method = method_on(pipes["digits-ddpm"], steps=1, teacher_steps=2, weighting=weighting)
        method.begin_round(1)
        torch.manual_seed(0)
        real = torch.randn(4, 1, 8, 8)
        losses[weighting] = method.training_step(Batch(size=4, real=real), 0).losses["generator"].detach()
    (t,) = method.grid()
    snr = method.schedule.snr(torch.tensor(t)).item()
    assert snr < 1
    torch.testing.assert_close(losses["truncated_snr"], losses["x0"])
    torch.testing.assert_close(losses["eps"], snr * losses["x0"])


@pytest.mark.parametrize("name", ["digits-ddpm", "fmnist-ldm"])
def test_every_rounds_export_is_the_methods_own_sampler(pipes, tmp_path, name):
    """Each round's N-step student (N = 6 and 3: neither divides T = 1000) exported as a plain DDIMScheduler folder;
    the plain call (ConsistencyModelPipeline / StableDiffusionPipeline at guidance W) gives the method's own DDIM
    samples."""
    guided = name == "fmnist-ldm"
    pipe = pipes[name]
    method = method_on(pipe, steps=3, teacher_steps=6, **({"guidance_min": 1.0, "guidance_max": 5.0} if guided else {}))
    with torch.no_grad():
        for p in method.student.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for r, n in enumerate(method.round_steps):
        method.round.fill_(r)
        folder = export(method, pipe, tmp_path / f"round-{r}")
        meta = read_metadata(folder)
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert meta["timesteps"] == ddim_grid(1000, 6, n) and config["num_train_timesteps"] == 996
        assert config["_class_name"] == "DDIMScheduler" and config["prediction_type"] == "v_prediction"
        student = DiffusionPipeline.from_pretrained(folder)
        shape = (2, *method.latent_shape)
        noise = randn_tensor(shape, generator=torch.Generator().manual_seed(r))
        if guided:
            prompts = ["a photo of a bag", "a photo of a shirt"]
            for w in (1.5, 4.0):
                got = student(prompts, num_inference_steps=n, guidance_scale=w, output_type="latent",
                              generator=torch.Generator().manual_seed(r)).images
                with torch.no_grad():
                    want = method.sample(noise, encode_prompts(pipe, prompts)[0], guidance_scale=w)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        else:
            got = torch.from_numpy(student(batch_size=2, num_inference_steps=n, output_type="np",
                                           generator=torch.Generator().manual_seed(r)).images).permute(0, 3, 1, 2)
            want = (method.sample(noise) / 2 + 0.5).clamp(0, 1)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_resume_across_a_round_boundary_is_exact(tmp_path):
    """Killed inside the first round, at the round boundary and inside the second round, resumed from the checkpoint
    before: bit-equal to the whole run, the round's teacher and the round counter included."""
    torch.set_num_threads(1)
    recipe = tmp_path / "pd.toml"
    recipe.write_text("""method = "progressive"
teacher = "digits-ddpm"
[student]
num_steps = 3
[progressive]
teacher_steps = 6
[optim.generator]
lr = 1e-3
[data]
real = "zoo"
max_real_images = 64
[train]
steps = 6
batch_size = 4
checkpoint_every = 1
log_every = 1
progress = false
""")
    whole = assert_resumes_exactly(ProgressiveDistillation, recipe, "digits-ddpm", tmp_path, stops=(2, 3, 5))
    state = json.loads((whole / "train_log.json").read_text())
    assert state["update_counts"] == {"generator": 6}
    final = load_file(str(whole / "checkpoints" / "checkpoint-0000006" / "model.safetensors"))
    assert int(final["round"]) == 1
    name = next(k for k in final if k.startswith("round_teacher.model.") and k.endswith("conv_in.weight"))
    assert not torch.equal(final[name], final[name.replace("round_teacher.", "student.")])  # round 1 trained on
    assert read_metadata(whole / "rounds" / "round-0")["timesteps"] == [995, 829, 663, 497, 331, 165]
    assert read_metadata(whole / "student")["timesteps"] == [995, 663, 331]


@pytest.mark.parametrize("setting, message", [
    ("progressive.teacher_steps=48", "teacher_steps = 48 does not halve to student.num_steps = 5 (48 -> 24 -> 12 -> 6)"),
    ("progressive.prediction_type='epsilon'", "an epsilon-output student cannot take a step"),
    ("student.timesteps=[999]", "progressive sets the student's timesteps itself"),
    ("progressive.guidance_min=2.0", "guidance_min and guidance_max go together"),
    ("progressive.weighting='l1'", "weighting must be one of truncated_snr, x0, eps, not 'l1'"),
])
def test_recipe_errors(setting, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("pd_digits", [setting, "student.num_steps=5"] if "48" in setting else [setting])


def test_the_learning_rate_decays_to_zero_in_each_round():
    from fastgen.train.trainer import _lr_factor

    factor = _lr_factor(OptimizerOptions(warmup_steps=0, decay="linear"), lambda: 4)
    assert [factor(i) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert ProgressiveDistillation.optimizer_defaults["generator"].decay == "linear"
