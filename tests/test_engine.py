"""The method contract: a method defined here, outside the package, trains, resumes and exports through the
unchanged runner and trainer; recipes validate against each method's own sections."""

import json
import textwrap
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import Killed, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from safetensors.torch import load_file
from torch import nn

from fastgen.methods import (Batch, DistillationMethod, OptimizerOptions, StepOutput, get_method, register,
                             student_parameters)
from fastgen.methods.base import option
from fastgen.pipelines.export import read_metadata
from fastgen.train import recipes
from fastgen.train.runner import run_training


@dataclass
class ShiftOptions:
    """Options of the test method (its recipe section [test_shift])."""

    shift: float = option(0.1, "the student learns the teacher's x0 plus this")

    def validate(self):
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}.")


@register
class ShiftedRegression(DistillationMethod):
    """A small method of this test: the student regresses the teacher's x0 + shift, an extra group learns
    `shift` itself, a buffer counts the samples seen, and training runs in two rounds."""

    name = "test_shift"
    Options = ShiftOptions
    optimizer_defaults = {"generator": OptimizerOptions(lr=1e-3, warmup_steps=0),
                          "offset": OptimizerOptions(lr=5e-2, warmup_steps=0, weight_decay=0.0)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset = nn.Parameter(torch.zeros(()))
        self.register_buffer("seen", torch.zeros(()))   # not trained, must survive a resume
        self.register_buffer("round", torch.zeros(()))  # set by begin_round
        self.rounds_begun = []

    def parameter_groups(self):
        return {"generator": student_parameters(self.student), "offset": [self.offset]}

    def rounds(self, total_steps):
        return [total_steps // 2, total_steps - total_steps // 2]

    def begin_round(self, index):
        self.round.fill_(index)
        self.rounds_begun.append(index)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        z = self.noise(batch.size)
        with torch.no_grad():
            target = self.teacher(z, self.timesteps[0]).x0 + self.options.shift
        generator = F.mse_loss(self.student_x0(z, self.timesteps[0]), target)
        offset = (self.offset - self.options.shift * (1 + self.round)) ** 2
        self.seen += batch.size * (1 + torch.rand(()))  # depends on the RNG: resume must restore both
        losses = {"generator": generator} if step % 2 else {"generator": generator, "offset": offset}
        return StepOutput(losses, {"mse": generator.detach(), "offset": offset.detach()})


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm") / "teacher"
    torch.manual_seed(0)
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "shift.toml"
    path.write_text(textwrap.dedent("""
        method = "test_shift"
        [student]
        ema_decay = 0.5
        [test_shift]
        shift = 0.2
        [optim.offset]
        lr = 0.1
        [train]
        steps = 6
        batch_size = 3
        checkpoint_every = 2
        progress = false
    """))
    return str(path)


def test_a_method_from_outside_the_package_trains_resumes_and_exports(ddpm_teacher, recipe, tmp_path, monkeypatch):
    whole = run_training(recipe, teacher=str(ddpm_teacher), out=str(tmp_path / "a"))
    step_of = ShiftedRegression.training_step
    # killed part-way (in the first round; at the round boundary), resumed each time
    for stop in (2, 3):
        folder = tmp_path / f"stop{stop}"

        def dies(self, batch, step, stop=stop):
            if step == stop:
                raise Killed
            return step_of(self, batch, step)

        monkeypatch.setattr(ShiftedRegression, "training_step", dies)
        with pytest.raises(Killed):
            run_training(recipe, teacher=str(ddpm_teacher), out=str(folder))
        monkeypatch.setattr(ShiftedRegression, "training_step", step_of)
        resumed = run_training(recipe, teacher=str(ddpm_teacher), out=str(folder), resume=True)
        a = load_file(str(tmp_path / "a" / "checkpoints" / "checkpoint-0000006" / "model.safetensors"))
        b = load_file(str(folder / "checkpoints" / "checkpoint-0000006" / "model.safetensors"))
        assert {"seen", "round", "offset"} <= set(a) and a.keys() == b.keys()
        assert not any(k.startswith("teacher.") for k in a)  # the frozen teacher base is not stored
        for key in a:  # the trained weights, the extra group and the non-trained state, exactly
            assert torch.equal(a[key], b[key]), key
        assert float(a["round"]) == 1 and float(a["seen"]) > 6 * 3
        wa = load_file(str(next((whole / "unet").glob("*.safetensors"))))
        wb = load_file(str(next((resumed / "unet").glob("*.safetensors"))))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log["update_counts"] == {"generator": 6, "offset": 3} and log["method"] == "test_shift"
    assert read_metadata(whole)["method"] == "test_shift"
    assert type(DiffusionPipeline.from_pretrained(whole)).__name__ == "ConsistencyModelPipeline"  # a DDPM teacher's student
    assert read_metadata(tmp_path / "a" / "rounds" / "round-0")["round"] == 0  # each round's student is exported
    saved = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert saved["test_shift"] == {"shift": 0.2} and saved["optim"]["offset"]["lr"] == 0.1
    assert recipes.load_recipe(tmp_path / "a" / "recipe.json").to_dict() == saved  # recipe.json loads back


def test_resume_refuses_another_recipe_and_a_checkpoint_of_another_shape(ddpm_teacher, tmp_path):
    tiny = tmp_path / "tiny.toml"
    tiny.write_text('method = "dmd2"\n[student]\nlora_rank = 2\n[critic]\nlora_rank = 2\n'
                    '[train]\nsteps = 2\nbatch_size = 2\ncheckpoint_every = 1\nprogress = false\n')
    run_training(str(tiny), teacher=str(ddpm_teacher), out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"--resume: .*student.lora_rank: 2 in the run, 4 now"):
        run_training(str(tiny), ["student.lora_rank=4", "train.steps=3"], teacher=str(ddpm_teacher),
                     out=str(tmp_path / "r"), resume=True)
    # the checkpoint's own check, for a recipe.json that no longer says what the checkpoint holds
    recipe_json = tmp_path / "r" / "recipe.json"
    saved = json.loads(recipe_json.read_text())
    for rank, message in ((4, r"differ in shape .*stored.*LoRA rank"), (0, r"missing.*not this run's")):
        saved["student"]["lora_rank"] = rank
        recipe_json.write_text(json.dumps(saved))
        with pytest.raises(RuntimeError, match=message):
            run_training(str(tiny), [f"student.lora_rank={rank}", "train.steps=3"], teacher=str(ddpm_teacher),
                         out=str(tmp_path / "r"), resume=True)


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("text, error, message", [
    ('method = "nope"', ValueError, r"Unknown method 'nope'; available: .*dmd2.*sid"),
    ('method = "dmd2"\n[sid]\nalpha = 1.0', ValueError, r"\[sid\] holds options of method 'sid'.*\[dmd2\].*ratio"),
    ('method = "sid"\n[dmd2]\nratio = 2', ValueError, r"\[dmd2\] holds options of method 'dmd2'.*alpha"),
    ('method = "test_shift"\n[critic]\nlora_rank = 2', ValueError, r"method 'test_shift' has no \[critic\]"),
    ('method = "sid"\n[sid]\nalpha = 2.5', ValueError, r"\[sid\] alpha must be in \[0, 2\]"),
    ('method = "sid"\n[student]\nnum_steps = 0', ValueError, r"\[student\] num_steps must be >= 1"),
    ('method = "sid"\n[sid]\nguidance = "loud"', ValueError, r"guidance must be one of teacher, lsg, zero, anti"),
    ('method = "dmd2"\n[optim.teacher]\nlr = 1.0', ValueError, r"\[optim.teacher\]; method 'dmd2' trains generator, critic"),
    ('method = "dmd2"\n[student]\nlr = 1e-4', ValueError, r"moved to \[optim.generator\] lr"),
    ('method = "dmd2"\n[dmd2]\nguidance_scale = nan', ValueError, r"guidance_scale must be a finite number"),
    ('method = "dmd2"\n[optim.critic]\nlr = -1.0', ValueError, r"\[optim.critic\] lr must be > 0"),
    ('method = "dmd2"\n[train]\ngrad_accum = 0', ValueError, r"\[train\] grad_accum must be >= 1"),
    ('method = "dmd2"\n[train]\ncheckpoint_every = -1', ValueError, r"checkpoint_every must be >= 0"),
])
def test_recipe_errors_name_the_section_and_the_valid_choices(tmp_path, text, error, message):
    with pytest.raises(error, match=message):
        recipes.load_recipe(write(tmp_path, text))


def test_set_none_unsets_an_optional_key_and_only_an_optional_one():
    # Zero-CFG needs no guidance scale; a recipe that sets one is switched to it from the command line so
    recipe = recipes.load_recipe("sid_fmnist_4step", ["sid.guidance=zero", "sid.guidance_scale=none"])
    assert recipe.options.guidance == "zero" and recipe.options.guidance_scale is None
    with pytest.raises(ValueError, match=r"guidance = 'zero' uses no guidance scale; remove guidance_scale \(1.5\)"):
        recipes.load_recipe("sid_fmnist_4step", ["sid.guidance=zero"])
    with pytest.raises(ValueError, match=r"Recipe key 'train.steps' expects int, got 'none'"):
        recipes.load_recipe("sid_fmnist_4step", ["train.steps=none"])
    # and back: the teacher-CFG variant of the Zero-CFG recipe
    teacher_cfg = recipes.load_recipe("sid_fmnist_1step", ["sid.guidance=teacher", "sid.guidance_scale=1.5"])
    assert teacher_cfg.options.guidance_scale == 1.5


def test_a_method_needing_real_images_given_none_fails_before_training(ddpm_teacher, tmp_path):
    path = write(tmp_path, """
        method = "dmd2"
        [critic]
        gan_head = true
        [dmd2]
        gan_generator_weight = 0.01
        [train]
        steps = 1
        batch_size = 2
        progress = false
    """)
    with pytest.raises(ValueError, match=r"dmd2's GAN loss .* needs real images: set data.real"):
        run_training(path, teacher=str(ddpm_teacher), out=str(tmp_path / "x"))
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_registry_and_describe():
    assert get_method("test_shift") is ShiftedRegression
    text = recipes.describe_options()
    for needle in ("[sid]", "sid.alpha", "[dmd2]", "dmd2.ratio", "[optim.critic]", "[test_shift]", "test_shift.shift",
                   "[optim.offset]", "critic.gan_head"):
        assert needle in text, needle
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (ShiftedRegression,), {"name": "test_shift"}))
