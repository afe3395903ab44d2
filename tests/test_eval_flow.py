"""`fastgen eval` of flow students (issue 12): tiny SD3 and Flux students exported from pipelines built from diffusers'
classes, evaluated with their default call and with explicit continuous timesteps (t = sigma T, floats), at their
trained resolution; and explicit timesteps for an unconditional DDPMPipeline. The images eval generates must be
fastgen's sampler's (read back from the sample grid it writes)."""

import json

import numpy as np
import pytest
import torch
from conftest import flow_student, save_tiny_ddpm
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from fastgen.cli import main
from fastgen.eval.evaluate import evaluate
from fastgen.eval.generate import generate, timesteps_scheduler
from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.sampler import sample_multistep

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]
GUIDANCE = {"sd3": 2.0, "flux": 3.5}
FAMILIES = tuple(GUIDANCE)
RNG_SEED = 7  # torch's global RNG: the SD3 and Flux pipelines re-noise with it (their step gets no generator)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """``{family: (teacher pipeline, student network, student folder)}`` (:func:`conftest.flow_student`)."""
    return {family: flow_student(tmp_path_factory.mktemp(family), family, GUIDANCE[family]) for family in FAMILIES}


def grid_images(path, n, size):
    """The first ``n`` images of a sample grid eval wrote (nearest-upscaled 4x, 1-pixel white padding), ``[n, 3,
    size, size]`` in [0, 1]."""
    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    grid = grid[:, ::4, ::4]
    return torch.stack([grid[:, 1:1 + size, 1 + i * (size + 1):1 + i * (size + 1) + size] for i in range(n)])


def sampler_images(pipe, network, timesteps, guidance):
    """fastgen's sampler on eval's noise: the latents drawn from one generator seeded 0, the re-noising from the
    global RNG seeded ``RNG_SEED`` (as the plain pipeline draws them)."""
    sampler = PipelineSampler(pipe, network)
    with torch.no_grad():
        cond, uncond, w = sampler.conditioning(PROMPTS, guidance)
        noise = randn_tensor((2, *sampler.latent_shape), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(RNG_SEED)
        return sampler.decode(sample_multistep(sampler.denoiser, noise, timesteps, cond, uncond, w))


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_runs_flow_students_at_their_trained_call_resolution_and_float_timesteps(flow, family, tmp_path):
    pipe, network, folder = flow[family]
    trained = read_metadata(folder)["timesteps"]
    for name, explicit in (("default", None), ("explicit", [1000.0, 662.7])):
        torch.manual_seed(RNG_SEED)
        result = evaluate(str(folder), timesteps=explicit, num_images=2, metrics=["speed"], prompts=PROMPTS,
                          grid=tmp_path / f"{name}.png", progress=False)
        timesteps = explicit or trained
        assert result["call"]["sigmas"] == [t / 1000 for t in timesteps] and result["metrics"]["nfe"] == 2
        got = grid_images(tmp_path / f"{name}.png", 2, 16)  # 16x16: Flux's call would default to 256x256
        want = sampler_images(pipe, network, timesteps, GUIDANCE[family])
        torch.testing.assert_close(got, want, atol=1.5 / 255, rtol=0)  # the grid is 8-bit


def test_the_eval_command_takes_float_timesteps_for_flow_and_whole_numbers_for_vp(flow, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    folder = str(flow["flux"][2])
    out = tmp_path / "ev"
    assert main(["eval", folder, "--timesteps", "1000.0,662.7", "--num-images", "2", "--metrics", "speed",
                 "--prompts", str(prompts), "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["call"]["sigmas"] == pytest.approx([1.0, 0.6627])
    assert Image.open(out / "samples.png").size == (4 * 35, 4 * 18)  # two 16x16 images, 1-pixel padding, 4x
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"out of range \(0, 1000\] \(flow timesteps t = sigma T"):
        evaluate(folder, timesteps=[1000.5, 500], num_images=2, metrics=["speed"], prompts=PROMPTS, progress=False)
    with pytest.raises(ValueError, match="a flow pipeline runs explicit timesteps .* give --solver euler"):
        evaluate(folder, timesteps=[1000.0, 500.0], solver="unipc", num_images=2, metrics=["speed"], prompts=PROMPTS,
                 progress=False)
    assert main(["eval", "digits-ddpm", "--timesteps", "999.5", "--num-images", "2", "--metrics", "speed"]) == 2
    assert "--timesteps [999.5]: Timesteps must be whole numbers" in capsys.readouterr().err


def test_explicit_timesteps_of_a_shifted_flow_teacher_run_as_given(flow):
    """A teacher's flow scheduler shifts the sigmas it is passed (SD3: shift 3): eval runs explicit timesteps with
    it unshifted, so the call's sigmas = t / T run exactly t."""
    scheduler = flow["sd3"][0].scheduler
    assert scheduler.config.shift == 3.0
    run = timesteps_scheduler(scheduler)
    run.set_timesteps(sigmas=[1.0, 0.6627])
    torch.testing.assert_close(run.timesteps, torch.tensor([1000.0, 662.7]))


def test_eval_runs_explicit_timesteps_on_an_unconditional_ddpm_pipeline(tmp_path):
    """DDPMPipeline's call takes no timesteps, eval's generation loop does: DDPM on [999, 499] is the pipeline's
    own 2-step call with trailing spacing (which runs those timesteps), image for image."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = save_tiny_ddpm(tmp_path / "ddpm")
    out = tmp_path / "ev"
    assert main(["eval", str(folder), "--timesteps", "999,499", "--num-images", "4", "--metrics", "speed",
                 "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["call"]["timesteps"] == [999, 499] and result["metrics"]["nfe"] == 2
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    got = generate(pipe, 4, timesteps=[999, 499], batch_size=4, progress=False).images
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    want = pipe(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(got, want.images, atol=1e-5, rtol=0)
