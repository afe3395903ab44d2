"""Guidance-conditioned students: the teacher's UNet with diffusers' w-embedding starts as the teacher, and the
exported folder's plain call `pipe(prompt, num_inference_steps=N, guidance_scale=W)` is fastgen's sampler."""

import pytest
import torch
from conftest import tiny_cond_unet, tiny_sd3_transformer, tiny_unet
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from fastgen import zoo
from fastgen.guidance_embedding import guidance_conditioned_network, guidance_embedding
from fastgen.pipelines.export import export_student
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.sampler import student_timesteps

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


@pytest.fixture(scope="module")
def fmnist():
    return DiffusionPipeline.from_pretrained(zoo.path("fmnist-ldm"))


def test_the_embedding_is_the_pipelines():
    for w in (1.0, 1.7, 8.0):
        want = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor(w - 1).repeat(3), 256)
        assert torch.equal(guidance_embedding(w, 3, 256), want)
    per_sample = guidance_embedding(torch.tensor([2.0, 5.0]), 2, 32)
    assert torch.equal(per_sample[1], guidance_embedding(5.0, 1, 32)[0])


@pytest.mark.parametrize("make", [tiny_cond_unet, "fmnist"])
def test_the_rebuilt_network_starts_as_the_teacher_for_every_w(make, fmnist):
    teacher = fmnist.unet if make == "fmnist" else make()
    flags = [p.requires_grad for p in teacher.parameters()]
    student = guidance_conditioned_network(teacher, dim=64)
    assert student.config.time_cond_proj_dim == 64 and teacher.config.time_cond_proj_dim is None
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([999, 500, 3])
    states = torch.randn(3, 5, teacher.config.cross_attention_dim)
    with torch.no_grad():
        want = teacher(x, t, encoder_hidden_states=states).sample
        for w in (0.0, 2.5, 12.0):
            got = student(x, t, encoder_hidden_states=states, timestep_cond=guidance_embedding(w, 3, 64)).sample
            assert torch.equal(got, want), w
    assert all(p.requires_grad for p in student.parameters())
    assert [p.requires_grad for p in teacher.parameters()] == flags  # the teacher is untouched


@pytest.mark.parametrize("network", [tiny_unet, tiny_sd3_transformer])
def test_networks_without_the_embedding_are_refused_in_one_line(network):
    with pytest.raises(ValueError, match=r"time_cond_proj_dim\): UNet2DConditionModel; this teacher's network is a "
                                         + network().__class__.__name__):
        guidance_conditioned_network(network())


@pytest.mark.parametrize("sampler, steps", [("ddim", 2), ("multistep", 4)])
def test_the_plain_call_feeds_the_embedding_and_equals_fastgens_sampler(fmnist, tmp_path, sampler, steps):
    student = guidance_conditioned_network(fmnist.unet)
    with torch.no_grad():  # a student whose output depends on w
        student.time_embedding.cond_proj.weight.normal_(0, 0.05)
    timesteps = student_timesteps(PipelineSampler(fmnist).denoiser.schedule, steps, sampler)
    folder = export_student(fmnist, tmp_path / "student", model=student, timesteps=timesteps, sampler=sampler,
                            method="test", guidance_scale=3.0)
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.time_cond_proj_dim == 256
    images = {}
    for w in (1.5, 4.0):
        ours = PipelineSampler(fmnist, student)(PROMPTS, timesteps=timesteps, sampler=sampler, guidance_scale=w,
                                                generator=torch.Generator().manual_seed(3))
        theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=w, output_type="pt",
                      generator=torch.Generator().manual_seed(3)).images
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        images[w] = ours
    assert (images[1.5] - images[4.0]).abs().max() > 1e-3  # the embedding really reaches the network
