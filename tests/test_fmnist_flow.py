"""The fmnist-flow zoo teacher (issue 12): a few steps of ``fastgen zoo train fmnist-flow`` write an SD3 folder that
plain diffusers loads (T5-less, with fmnist-ldm's frozen VAE and text encoder), whose call with the card's
``max_sequence_length=0`` equals fastgen's sampler, and that ``fastgen eval`` / ``bench`` score with the Fashion-MNIST
classifier through diffusers' flow solvers."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

from fastgen import zoo
from fastgen.cli import main
from fastgen.eval.classifiers import classifier_for
from fastgen.pipelines.generate import PipelineSampler, encode_prompts
from fastgen.pipelines.loading import load_pipeline
from fastgen.pipelines.prompts import prompt_options
from fastgen.train.teachers import train_teacher


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """A zoo folder holding a 20-step fmnist-flow (8 images a batch, 64 training images)."""
    root = tmp_path_factory.mktemp("zoo")
    train_teacher("fmnist-flow", out=root / "fmnist-flow", steps=20, batch_size=8, max_train_images=64)
    return root


def test_registry():
    assert "fmnist-flow" in zoo.names() and zoo.RECOMMENDED_GUIDANCE["fmnist-flow"] == 2.0
    assert classifier_for("fmnist-flow") == "fmnist"
    assert zoo.path("fmnist-flow", check=False).name == "fmnist-flow"


def test_plain_load_reuses_fmnist_ldm_and_matches_fastgen(zoo_dir):
    folder = zoo_dir / "fmnist-flow"
    log = json.loads((folder / "training_log.json").read_text())
    assert log["config"]["steps"] == 20 and log["transformer_loss"][0][1] > 0
    pipe = DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    ldm = DiffusionPipeline.from_pretrained(zoo.path("fmnist-ldm"))
    for mine, theirs in ((pipe.vae, ldm.vae), (pipe.text_encoder.text_model, ldm.text_encoder),
                         (pipe.text_encoder_2.text_model, ldm.text_encoder)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(64))
    with torch.no_grad():
        plain = pipe("a photo of a bag", num_inference_steps=4, guidance_scale=2.0, max_sequence_length=0,
                     output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ours = load_pipeline(str(folder))
    assert prompt_options(ours) == {"max_sequence_length": 0}
    cond, _ = encode_prompts(ours, ["a photo of a bag"], guidance=False)
    assert cond.encoder_hidden_states.shape == (1, 32, 128)  # the 32 CLIP tokens, no T5 tokens
    sampler = PipelineSampler(ours)
    pipe.scheduler.set_timesteps(4)  # SD3's call with num_inference_steps=4: sigmas 1 .. 1/1000, evenly spaced
    timesteps = pipe.scheduler.timesteps.tolist()
    latents = sampler(["a photo of a bag"], timesteps=timesteps, sampler="ddim", guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0), output="latents")
    assert torch.allclose(plain, latents, atol=1e-5), (plain - latents).abs().max()


def test_eval_and_bench_with_flow_solvers(zoo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(zoo, "ZOO_DIR", zoo_dir)
    assert main(["eval", "fmnist-flow", "--steps", "2", "--num-images", "20", "--metrics", "fd,acc",
                 "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["zoo"] == "fmnist-flow" and result["call"]["max_sequence_length"] == 0
    assert result["metrics"]["fd"] > 0 and 0 <= result["metrics"]["acc"] <= 1
    assert main(["bench", "fmnist-flow", "--nfes", "1,2", "--num-images", "100", "--batch-size", "100",
                 "--out", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert sorted({r["sampler"] for r in rows}) == ["dpm++2m", "euler", "unipc"]
    assert all(r["fd"] > 0 for r in rows)
    fd = {(r["sampler"], r["nfe"]): r["fd"] for r in rows}
    assert fd["dpm++2m", 2] != fd["euler", 2]  # a different solver, not Euler again
    assert main(["bench", "fmnist-flow", "--solvers", "nope"]) == 2
    assert "unknown solver" in capsys.readouterr().err


def test_scm_student_of_fmnist_flow_exports_the_teachers_prompt_options(zoo_dir, tmp_path, monkeypatch):
    """The shipped recipe scm_fmnist_flow, 2 steps on the zoo's Fashion-MNIST latents: the student's folder records
    max_sequence_length=0 and its README call, run in a fresh diffusers-only process, equals fastgen's sampler."""
    from fastgen.pipelines.export import read_metadata
    from fastgen.train.runner import run_training

    monkeypatch.setattr(zoo, "ZOO_DIR", zoo_dir)
    student = run_training("scm_fmnist_flow", ["train.steps=2", "train.batch_size=4", "data.max_real_images=8",
                                               "train.checkpoint_every=0", "train.progress=false",
                                               "data.num_workers=0"], out=str(tmp_path / "run"))
    meta = read_metadata(student)
    assert meta["call"] == "sigmas=[1.0, 0.6627], guidance_scale=0.0, max_sequence_length=0"
    assert prompt_options(load_pipeline(str(student))) == {"max_sequence_length": 0}
    assert "text_encoder_3=None, tokenizer_3=None" in (student / "README.md").read_text()
    assert_plain_call_matches_fastgen(student)


@pytest.mark.parametrize("recipe, sigmas", [("dmd2_fmnist_flow_1step", [1.0]), ("sid_fmnist_flow_1step", [1.0]),
                                            ("sid_fmnist_flow_4step", [1.0, 0.75, 0.5, 0.25])])
def test_students_of_fmnist_flow_start_from_pure_noise_and_load_in_plain_diffusers(recipe, sigmas, zoo_dir, tmp_path,
                                                                                   monkeypatch):
    """The shipped DMD2 and SiD recipes of the flow teacher (1 and 4 steps), 2 training steps: the student starts at
    sigma 1 (timestep 1000.0, not an integer below 1000), runs at the teacher's flow sigmas x 1000, and its README
    call in a fresh diffusers-only process equals fastgen's sampler."""
    from fastgen.pipelines.export import read_metadata
    from fastgen.train.runner import run_training

    monkeypatch.setattr(zoo, "ZOO_DIR", zoo_dir)
    student = run_training(recipe, ["train.steps=2", "train.batch_size=4", "train.checkpoint_every=0",
                                    "train.progress=false"], out=str(tmp_path / "run"))
    meta = read_metadata(student)
    assert meta["timesteps"] == [1000.0 * sigma for sigma in sigmas]
    assert meta["call"] == f"sigmas={sigmas}, guidance_scale=0.0, max_sequence_length=0"
    assert_plain_call_matches_fastgen(student)


def assert_plain_call_matches_fastgen(student):
    """The student folder's README call, run in a fresh process with only diffusers, equals fastgen's sampler."""
    import subprocess
    import sys
    import textwrap

    from safetensors.torch import load_file
    from test_flow_teachers import PLAIN, fastgen_latents

    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PLAIN), str(student)], capture_output=True,
                            text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, _ = fastgen_latents(student)
    torch.testing.assert_close(load_file(str(student / "plain.safetensors"))["latents"], ours, atol=1e-5, rtol=0)
