"""FewStepPipeline on flow students (issue 12): SD3 and Flux students (transformer, packed latents for Flux, its
second text encoder and guidance embedding, dynamic shifting) exported from tiny pipelines built from diffusers'
classes, at their continuous trained timesteps (t = sigma T, floats) and, for Flux, their trained 16x16 resolution.
Their default call must equal fastgen's sampler, a one-step call the plain folder's, an N-step call run the plain
pipeline's timesteps, and the hybrid modes must do on a flow teacher what they do on a VP one."""

import pytest
import torch
from conftest import flow_student
from diffusers import DiffusionPipeline

from fastgen.pipelines import FewStepPipeline
from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.sampler import sample_ddim

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]
GUIDANCE = {"sd3": 2.0, "flux": 3.5}  # SD3: classifier-free guidance; this Flux embeds its guidance (no CFG)
FAMILIES = tuple(GUIDANCE)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """``{family: (teacher pipeline, student network, student folder)}`` (:func:`conftest.flow_student`)."""
    return {family: flow_student(tmp_path_factory.mktemp(family), family, GUIDANCE[family]) for family in FAMILIES}


def plain_pipeline(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_students_run_their_trained_call_as_fastgens_sampler_and_the_plain_folder(flow, family):
    pipe, network, folder = flow[family]
    meta = read_metadata(folder)
    trained = meta["timesteps"]
    assert trained[0] == 1000.0 and all(isinstance(t, float) for t in trained)  # 750.0 (SD3), 612.87 (Flux)
    few = FewStepPipeline.from_pretrained(folder)
    assert few.config.base_pipeline == type(pipe).__name__
    ours = few(PROMPTS, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert ours.shape == (2, 3, 16, 16)  # the trained resolution (Flux's call would default to 256x256)
    want = PipelineSampler(pipe, network)(PROMPTS, timesteps=trained, guidance_scale=GUIDANCE[family],
                                          generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    # one step at an explicit continuous timestep: the plain folder's call with sigmas = t / T (one step: no
    # re-noising, whose noise the plain SD3 and Flux pipelines draw from torch's global RNG, not the generator)
    one = few(PROMPTS, timesteps=[662.7], generator=torch.Generator().manual_seed(2), output_type="pt").images
    plain = plain_pipeline(folder)
    got = plain(PROMPTS, sigmas=[0.6627], guidance_scale=GUIDANCE[family], height=16, width=16,
                generator=torch.Generator().manual_seed(2), output_type="pt").images
    torch.testing.assert_close(one, got, atol=1e-4, rtol=0)
    # N steps run what the plain pipeline runs for N (SD3: the scheduler's own spacing; Flux: sigmas 1 .. 1/N)
    few(PROMPTS[0], num_inference_steps=3, output_type="latent")
    plain(PROMPTS[0], num_inference_steps=3, height=16, width=16, output_type="latent")
    torch.testing.assert_close(few.scheduler.timesteps, plain.scheduler.timesteps, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"out of range \(0, 1000\]"):
        few(PROMPTS[0], timesteps=[1000.5, 500.0])


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_refinement_on_a_flow_teacher_moves_x0_to_the_teachers(flow, family):
    """teacher_refine = 1 at the student's own first timestep gives the teacher's one-step sample (its x0 at the
    same x_T, with the teacher's guidance); 0.5 lies halfway between that and the student's own sample."""
    pipe, _, folder = flow[family]
    few = FewStepPipeline.from_pretrained(folder).load_teacher(pipe)
    kwargs = {"timesteps": [1000.0], "teacher_guidance_scale": GUIDANCE[family], "output_type": "latent"}
    full = few(PROMPTS, teacher_refine=1.0, generator=torch.Generator().manual_seed(4), **kwargs).images
    teacher_only = PipelineSampler(pipe)(PROMPTS, timesteps=[1000.0], guidance_scale=GUIDANCE[family],
                                         generator=torch.Generator().manual_seed(4), output="latents")
    torch.testing.assert_close(full, teacher_only, atol=1e-5, rtol=0)
    student = few(PROMPTS, generator=torch.Generator().manual_seed(4), **kwargs).images
    assert (student - full).abs().max() > 1e-3  # the student is not the teacher
    half = few(PROMPTS, teacher_refine=0.5, generator=torch.Generator().manual_seed(4), **kwargs).images
    torch.testing.assert_close(half, (student + full) / 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_steps_on_a_flow_teacher_hand_over_on_its_trajectory(flow, family):
    """With one network as teacher and DDIM (Euler) 'student', teacher steps then student steps are one Euler run
    over both timestep lists. A student starting at sigma 1 hands over its first step; one starting below gets
    the span above it split evenly in t."""
    pipe, network, folder = flow[family]
    trained = read_metadata(folder)["timesteps"]
    ddim = {**read_metadata(folder), "sampler": "ddim"}
    few = FewStepPipeline.from_pretrained(folder, teacher=network, teacher_scheduler=pipe.scheduler, student=ddim)
    w = GUIDANCE[family]
    got = few(PROMPTS, teacher_steps=1, teacher_guidance_scale=w, generator=torch.Generator().manual_seed(3),
              output_type="latent").images
    sampler = PipelineSampler(pipe, network)
    cond, uncond, w_used = sampler.conditioning(PROMPTS, w)
    noise = torch.randn((2, *sampler.latent_shape), generator=torch.Generator().manual_seed(3))
    want = sample_ddim(sampler.denoiser, noise, trained, cond, uncond, w_used)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    schedule = sampler.denoiser.schedule
    assert few._teacher_part([500.0], 2, schedule) == ([1000.0, 750.0], [500.0])
    assert few._teacher_part(trained, 1, schedule) == ([1000.0], trained[1:])
