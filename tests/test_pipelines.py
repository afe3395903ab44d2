"""FewStepPipeline: any exported student folder with the student's own defaults, equal to fastgen's sampler and to
the plain folder; its hybrid modes (teacher steps, teacher refinement) checked against what they must equal."""

import json

import pytest
import torch
from conftest import perturbed, tiny_sd3_pipeline
from diffusers import DiffusionPipeline

from fastgen import zoo
from fastgen.pipelines import FewStepPipeline
from fastgen.pipelines.export import export_student, read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.sampler import sample_ddim, sample_multistep

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    sd3 = tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))
    return {"fmnist-ldm": DiffusionPipeline.from_pretrained(zoo.path("fmnist-ldm")),
            "digits-ddpm": DiffusionPipeline.from_pretrained(zoo.path("digits-ddpm")), "sd3": sd3}


def plain_images(folder, seed, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


# (teacher, trained timesteps, student guidance, the plain call's arguments besides the prompts)
STUDENTS = [
    ("fmnist-ldm", [749], 0.0, {"num_inference_steps": 1, "guidance_scale": 0.0}),
    ("fmnist-ldm", [999, 749, 499, 249], 2.0, {"num_inference_steps": 4, "guidance_scale": 2.0}),
    ("fmnist-ldm", [625, 300], 0.0, {"timesteps": [625, 300], "guidance_scale": 0.0}),
    ("digits-ddpm", [749], None, {"num_inference_steps": 1}),
    ("sd3", [999], 0.0, {"sigmas": [0.999], "guidance_scale": 0.0}),
]


@pytest.mark.parametrize("name, timesteps, guidance, call", STUDENTS,
                         ids=[f"{s[0]}-{len(s[1])}step" + ("-custom" if "timesteps" in s[3] else "") for s in STUDENTS])
def test_defaults_are_the_students_and_equal_the_sampler_and_the_plain_folder(teachers, tmp_path, name, timesteps,
                                                                              guidance, call):
    pipe = teachers[name]
    text = hasattr(pipe, "encode_prompt")
    network = perturbed(pipe.unet if name != "sd3" else pipe.transformer)
    folder = export_student(pipe, tmp_path / "student", model=network, timesteps=timesteps, method="dmd2",
                            guidance_scale=guidance or 0.0)
    few = FewStepPipeline.from_pretrained(folder)
    assert few.config.student["timesteps"] == timesteps and few.config.base_pipeline == type(
        DiffusionPipeline.from_pretrained(folder)).__name__
    inputs = {"prompt": PROMPTS} if text else {"batch_size": 2}
    ours = few(**inputs, generator=torch.Generator().manual_seed(1), output_type="pt").images
    sampler = PipelineSampler(pipe, network)
    gen = torch.Generator().manual_seed(1)
    want = sampler(PROMPTS, timesteps=timesteps, guidance_scale=guidance, generator=gen) if text else \
        sampler(batch_size=2, timesteps=timesteps, generator=gen)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    inputs = {"prompt": PROMPTS} if text else {"batch_size": 2}
    if name == "sd3":
        inputs.update(height=16, width=16)
    torch.testing.assert_close(ours, plain_images(folder, 1, **inputs, **call), atol=1e-4, rtol=0)


def test_step_counts_output_types_and_save(teachers, tmp_path):
    pipe = teachers["fmnist-ldm"]
    folder = export_student(pipe, tmp_path / "s", model=perturbed(pipe.unet), timesteps=[749], method="dmd2")
    few = FewStepPipeline.from_pretrained(folder)
    for n in (2, 4):  # N steps as the exported scheduler spreads them: the plain pipeline's N-step call
        ours = few(PROMPTS, num_inference_steps=n, generator=torch.Generator().manual_seed(n), output_type="pt").images
        torch.testing.assert_close(ours, plain_images(folder, n, prompt=PROMPTS, num_inference_steps=n,
                                                      guidance_scale=0.0), atol=1e-4, rtol=0)
    shapes = {kind: few(PROMPTS[0], output_type=kind).images for kind in ("pil", "np", "pt", "latent")}
    assert shapes["pil"][0].size == (32, 32) and shapes["np"].shape == (1, 32, 32, 1)
    assert shapes["pt"].shape == (1, 1, 32, 32) and shapes["latent"].shape == (1, 4, 8, 8)
    assert few(PROMPTS, num_images_per_prompt=3, output_type="pt").images.shape[0] == 6
    with pytest.raises(ValueError, match="output_type must be one of"):
        few(PROMPTS[0], output_type="jpeg")
    few.save_pretrained(tmp_path / "saved")  # the plain folder again, with its metadata
    assert read_metadata(tmp_path / "saved") == read_metadata(folder)
    plain = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(plain).__name__ == "StableDiffusionPipeline"
    assert (tmp_path / "saved" / "tokenizer" / "vocab.json").is_file()
    (tmp_path / "bare").mkdir()
    pipe.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="has no fastgen metadata"):
        FewStepPipeline.from_pretrained(tmp_path / "bare")


def test_flow_student_multistep_matches_the_plain_folder_with_its_rng(teachers, tmp_path):
    """StableDiffusion3Pipeline does not pass the generator to scheduler.step: a multistep flow student re-noises
    with torch's global RNG there. With that RNG seeded, fastgen's sampler (global RNG for the re-noising) gives
    the plain folder's latents; FewStepPipeline draws everything from the generator (reproducible)."""
    pipe = teachers["sd3"]
    network = perturbed(pipe.transformer)
    folder = export_student(pipe, tmp_path / "s", model=network, timesteps=[999, 499], method="dmd2")
    assert read_metadata(folder)["call"] == "sigmas=[0.999, 0.499], guidance_scale=0.0"
    torch.manual_seed(5)
    plain = DiffusionPipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    torch.manual_seed(5)
    got = plain(PROMPTS, sigmas=[0.999, 0.499], guidance_scale=0.0, generator=torch.Generator().manual_seed(2),
                output_type="latent").images
    sampler = PipelineSampler(pipe, network)
    cond, _, _ = sampler.conditioning(PROMPTS, 0.0)
    noise = torch.randn((2, *sampler.latent_shape), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    want = sample_multistep(sampler.denoiser, noise, [999, 499], cond, generator=None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    few = FewStepPipeline.from_pretrained(folder)
    a, b = (few(PROMPTS, generator=torch.Generator().manual_seed(2), output_type="latent").images for _ in range(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_teacher_steps_hand_over_on_the_teachers_trajectory(teachers, tmp_path):
    """With the teacher as its own DDIM 'student', teacher steps then student steps are one DDIM run over both
    timestep lists: the hand-over lands on x_t of the teacher's own trajectory."""
    pipe = teachers["fmnist-ldm"]
    folder = export_student(pipe, tmp_path / "s", timesteps=[499, 249], method="test")
    ddim = {**read_metadata(folder), "sampler": "ddim"}  # (DDIMScheduler exports need T//N-spaced timesteps)
    with pytest.raises(ValueError, match="cut the student.s schedule"):  # [499, 249]: the export cut the betas at 500
        FewStepPipeline.from_pretrained(folder, teacher=pipe.unet, student=ddim)(PROMPTS, teacher_steps=1)
    few = FewStepPipeline.from_pretrained(folder, teacher=pipe.unet, teacher_scheduler=pipe.scheduler, student=ddim)
    got = few(PROMPTS, teacher_steps=2, teacher_guidance_scale=2.0, guidance_scale=2.0,
              generator=torch.Generator().manual_seed(3), output_type="latent").images
    sampler = PipelineSampler(pipe)
    cond, uncond, _ = sampler.conditioning(PROMPTS, 2.0)
    noise = torch.randn((2, *sampler.latent_shape), generator=torch.Generator().manual_seed(3))
    want = sample_ddim(sampler.denoiser, noise, [999, 749, 499, 249], cond, uncond, 2.0)  # teacher: 999, 749
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    student_from_top = export_student(pipe, tmp_path / "top", timesteps=[999, 749, 499, 249], method="dmd2")
    few = FewStepPipeline.from_pretrained(student_from_top, teacher=pipe.unet)
    assert few._teacher_part([999, 749, 499, 249], 1, sampler.denoiser.schedule) == ([999], [749, 499, 249])
    assert few._teacher_part([749], 2, sampler.denoiser.schedule) == ([999, 874], [749])
    with pytest.raises(ValueError, match="at least one of its steps"):
        few(PROMPTS, teacher_steps=4)
    with pytest.raises(ValueError, match="need the teacher"):
        FewStepPipeline.from_pretrained(student_from_top)(PROMPTS, teacher_refine=0.5)


def test_teacher_refinement_moves_x0_to_the_teachers(teachers, tmp_path):
    """teacher_refine = 1 at a 1-step student's own timestep replaces its x0 by the teacher's x0 at the same x_t
    (re-noising with the student's own noise estimate returns x_t): the teacher's one-step sample. 0.5 is halfway."""
    pipe = teachers["fmnist-ldm"]
    student = perturbed(pipe.unet)
    folder = export_student(pipe, tmp_path / "s", model=student, timesteps=[749], method="dmd2")
    few = FewStepPipeline.from_pretrained(folder)
    few.load_teacher(pipe)
    kwargs = {"teacher_guidance_scale": 2.0, "output_type": "latent"}
    full = few(PROMPTS, teacher_refine=1.0, generator=torch.Generator().manual_seed(4), **kwargs).images
    teacher_only = PipelineSampler(pipe)(PROMPTS, timesteps=[749], guidance_scale=2.0,
                                         generator=torch.Generator().manual_seed(4), output="latents")
    torch.testing.assert_close(full, teacher_only, atol=1e-5, rtol=0)
    plain = few(PROMPTS, generator=torch.Generator().manual_seed(4), **kwargs).images
    half = few(PROMPTS, teacher_refine=0.5, generator=torch.Generator().manual_seed(4), **kwargs).images
    torch.testing.assert_close(half, (plain + full) / 2, atol=1e-5, rtol=0)
    lower = few(PROMPTS, teacher_refine=1.0, refine_timestep=249, generator=torch.Generator().manual_seed(4),
                **kwargs).images
    assert (lower - full).abs().max() > 1e-2  # evaluated elsewhere: another x0
    with pytest.raises(ValueError, match="teacher_refine must lie in"):
        few(PROMPTS, teacher_refine=1.5)


def test_loading_prints_no_warning(teachers, tmp_path, capfd):
    pipe = teachers["fmnist-ldm"]
    folder = export_student(pipe, tmp_path / "s", timesteps=[749], method="dmd2")
    capfd.readouterr()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        few = FewStepPipeline.from_pretrained(folder)
        few(PROMPTS[0], output_type="pt")
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    out, err = capfd.readouterr()
    assert out == err == "", err
    assert json.loads((folder / "model_index.json").read_text())["requires_safety_checker"] is False
