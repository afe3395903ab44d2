"""Flow-matching teachers end to end (issue 12): tiny pipelines built from diffusers' own classes and saved with
``save_pretrained`` -- SD3 with T5, SD3 saved without T5, Flux guidance-distilled (guidance embedding) with dynamic
shifting, Flux without the embedding (classifier-free guidance) with a static shift. Each is distilled for a few steps
with DMD2, SiD and CD through ``run_training`` -- the generic recipes a user runs on their own teacher
(``dmd2_4step``, ``sid_1step``, ``cd_4step``), told the number of steps --, exported, and a fresh process that
imports only diffusers loads every folder as its README states and runs the README's call: it must equal fastgen's
sampler on the same noise."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_flux_pipeline, tiny_sd3_pipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.loading import load_pipeline
from fastgen.pipelines.sampler import SAMPLERS
from fastgen.train.runner import run_training

PROMPT = "a photo of a sneaker"  # the README's prompt
RNG_SEED = 0  # the README seeds torch's global generator and the call's generator with 0
TEACHERS = ("sd3", "sd3-no-t5", "flux-guidance-dynamic", "flux-cfg-static")
METHODS = {  # method -> (the generic recipe it runs, its overrides): a 2-step student for DMD2 and CD, one step for SiD
    "dmd2": ("dmd2_4step", ["student.num_steps=2", "dmd2.ratio=1", "dmd2.guidance_scale=2.0"]),
    "sid": ("sid_1step", ["sid.guidance_scale=2.0"]),
    "cd": ("cd_4step", ["student.num_steps=2", "cd.guidance_scale=2.0"]),
}
CASES = [(teacher, method) for teacher in TEACHERS for method in METHODS]


def save_teacher(name, folder):
    """Write teacher ``name`` to ``folder`` and return the pipeline (SD3 without T5: saved with ``None`` for it)."""
    if name.startswith("sd3"):
        pipe = tiny_sd3_pipeline(folder)
        if name == "sd3-no-t5":
            pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    else:
        pipe = tiny_flux_pipeline(folder, guidance_embeds=name == "flux-guidance-dynamic",
                                  dynamic_shift=name == "flux-guidance-dynamic")
    pipe.save_pretrained(folder)
    return pipe


def overrides(method, prompts, images, flux):
    """The generic recipe's settings for a 2-step run on the tiny teacher (learning rates large enough to move it)."""
    sets = [*METHODS[method][1], "optim.generator.lr=1e-3", "optim.generator.warmup_steps=0", "train.steps=2",
            "train.batch_size=2", "train.checkpoint_every=0", "train.log_every=1", "train.progress=false",
            f"data.prompts={prompts}", "data.num_workers=0", f"data.resolution={16 if flux else 0}"]
    if method == "cd":
        return sets + [f"data.real={images}"]
    return sets + ["optim.critic.lr=1e-3", "optim.critic.warmup_steps=0"]


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """``{(teacher, method): (teacher folder, student folder)}``: every teacher distilled by every method."""
    from PIL import Image

    root = tmp_path_factory.mktemp("flow")
    (root / "prompts.txt").write_text("a photo of a sneaker\na photo of a bag\n")
    (root / "images").mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(root / "images" / f"{i}.png")
    torch.manual_seed(0)
    teachers = {}
    for name in TEACHERS:
        save_teacher(name, root / name)
        teachers[name] = root / name
    out = {}
    for teacher, method in CASES:
        sets = overrides(method, root / "prompts.txt", root / "images", teacher.startswith("flux"))
        folder = run_training(METHODS[method][0], sets, teacher=str(teachers[teacher]),
                              out=str(root / f"run-{teacher}-{method}"))
        out[teacher, method] = (teachers[teacher], folder)
    return out


PLAIN = """
import json, re, sys
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging
from safetensors.torch import save_file

logging.disable_progress_bar()
for folder in sys.argv[1:]:
    readme = open(folder + "/README.md").read()
    code = re.search(r"```python\\n(.*?)```", readme, re.S).group(1)
    code = code.replace("path/to/this/folder", folder).replace(".images[0]", ".images")
    code = code.replace("generator=torch.Generator()", "output_type='latent', generator=torch.Generator()")
    scope = {}
    exec(code, scope)
    save_file({"latents": scope["image"].contiguous()}, folder + "/plain.safetensors")
assert not any(name.split(".")[0] == "fastgen" for name in sys.modules), "fastgen was imported"
"""


@pytest.fixture(scope="module")
def plain(students):
    """Runs each folder's README code (latents instead of images) in one fresh process with only diffusers."""
    folders = [str(student) for _, student in students.values()]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PLAIN), *folders], capture_output=True, text=True,
                            env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    return {key: load_file(f"{student}/plain.safetensors")["latents"] for key, (_, student) in students.items()}


def fastgen_latents(folder):
    """fastgen's own sampler over the exported folder: the README's prompt, noise and seeds, the trained call."""
    meta = read_metadata(folder)
    pipe = load_pipeline(str(folder))
    size = re.search(r"height=(\d+)", meta["call"])
    if size:
        pipe.default_sample_size = int(size.group(1)) // pipe.vae_scale_factor
    sampler = PipelineSampler(pipe)
    with torch.no_grad():
        cond, uncond, w = sampler.conditioning([PROMPT], meta["guidance_scale"])
        noise = randn_tensor((1, *sampler.latent_shape), generator=torch.Generator().manual_seed(RNG_SEED))
        torch.manual_seed(RNG_SEED)  # the re-noising: torch's global generator, as SD3 and Flux draw it
        return SAMPLERS[meta["sampler"]](sampler.denoiser, noise, meta["timesteps"], cond, uncond, w, None), pipe


@pytest.mark.parametrize("teacher, method", CASES, ids=[f"{t}-{m}" for t, m in CASES])
def test_a_fresh_diffusers_process_runs_the_readme_call_as_fastgen_samples(students, plain, teacher, method):
    teacher_folder, folder = students[teacher, method]
    meta = read_metadata(folder)
    flow_steps = {"dmd2": 2, "sid": 1, "cd": 2}[method]
    assert meta["num_steps"] == flow_steps and meta["call"].startswith("sigmas=[1.0")
    assert all(isinstance(t, float) and 0 < t <= 1000 for t in meta["timesteps"])  # continuous, from sigma 1
    ours, pipe = fastgen_latents(folder)
    got = plain[teacher, method]
    if teacher.startswith("flux"):  # FluxPipeline returns its packed latents
        got = type(pipe)._unpack_latents(got, 16, 16, pipe.vae_scale_factor)
        assert meta["guidance_scale"] == (3.5 if teacher == "flux-guidance-dynamic" else 0.0)
        assert "height=16, width=16" in meta["call"]
    assert got.shape == ours.shape
    torch.testing.assert_close(got, ours, atol=1e-5, rtol=0)
    trained = dict(pipe.transformer.named_parameters())
    original = load_pipeline(str(teacher_folder)).transformer
    assert any(not torch.equal(p, trained[n]) for n, p in original.named_parameters())  # training changed it


def test_the_student_timesteps_follow_the_teachers_shift(students):
    """Static shift 3 (SD3): 2 steps at sigmas shift(1), shift(1/2) = 1, 0.75; dynamic (Flux-dev's config) at 16x16
    pixels (16 image tokens): mu from diffusers' calculate_shift, sigma = e^mu / (e^mu + 1) for u = 1/2."""
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert read_metadata(students["sd3", "dmd2"][1])["timesteps"] == [1000.0, 750.0]
    flux = read_metadata(students["flux-guidance-dynamic", "dmd2"][1])["timesteps"]
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    assert flux[0] == 1000.0 and flux[1] == pytest.approx(1000 * math.exp(mu) / (math.exp(mu) + 1), abs=1e-3)
    assert json.loads((students["sd3-no-t5", "sid"][1] / "model_index.json").read_text())["text_encoder_3"] == [None,
                                                                                                              None]
    assert "text_encoder_3=None, tokenizer_3=None" in (students["sd3-no-t5", "sid"][1] / "README.md").read_text()


BAD_INPUT = [  # (teacher, recipe overrides, the one-line error)
    ("sd3", ["student.timesteps=[1001, 500]", "student.num_steps=2"],
     "student.timesteps = [1001, 500]: Timesteps [1001.0] are out of range (0, 1000] (flow timesteps t = sigma T"),
    ("sd3", ["student.timesteps=[0.0]"], "Timesteps [0.0] are out of range (0, 1000]"),
    ("sd3", ["method=progressive"], "progressive supports discrete VP teachers (a DDPM-family scheduler; epsilon, "
                                    "sample or v_prediction), not this FlowSchedule teacher (flow)"),
    ("sd3", ["method=lcm", "data.real=zoo"], "lcm.guidance_embedding needs a teacher network that takes diffusers' "
                                             "guidance embedding (time_cond_proj_dim)"),
    ("sd3", ["data.resolution=18"], "data.resolution = 18 must be a multiple of 8"),
    ("fmnist-ldm", ["data.resolution=64"], "data.resolution applies to transformer pipelines (SD3, Flux)"),
]


@pytest.mark.parametrize("teacher, overrides, message", BAD_INPUT, ids=[" ".join(c[1]) for c in BAD_INPUT])
def test_bad_input_for_flow_teachers_is_one_line_before_training(students, teacher, overrides, message, tmp_path,
                                                                  capsys):
    from fastgen.cli import main

    source = str(students["sd3", "dmd2"][0]) if teacher == "sd3" else teacher
    (tmp_path / "prompts.txt").write_text("a photo of a bag\n")
    (tmp_path / "recipe.toml").write_text(f'method = "dmd2"\n[data]\nprompts = "{tmp_path / "prompts.txt"}"\n'
                                          '[train]\nsteps = 1\nbatch_size = 2\nprogress = false\n')
    argv = ["train", str(tmp_path / "recipe.toml"), "--teacher", source, "--out", str(tmp_path / "run")]
    code = main(argv + [a for o in overrides for a in ("--set", o)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_flux_lora_student_and_critic_and_gan_features(students):
    """LoRA student and critic on one frozen Flux base (the transformer targets: both attention streams, the
    feed-forward layers and the single-block MLP), and the critic's GAN head on the double-stream tokens."""
    from fastgen.critic import CriticOptions
    from fastgen.methods import Batch, get_method
    from fastgen.methods.base import StudentOptions
    from fastgen.pipelines.generate import encode_prompts
    from fastgen.train.runner import set_resolution

    pipe = load_pipeline(str(students["flux-cfg-static", "dmd2"][0]))
    set_resolution(pipe, 16)
    base = PipelineSampler(pipe).denoiser
    from fastgen.lora import AdapterDenoiser

    teacher = AdapterDenoiser(base.model, base.schedule, None, base.sample_size)
    cls = get_method("dmd2")
    method = cls(teacher, [1000.0], cls.Options(ratio=1, guidance_scale=2.0, gan_generator_weight=0.1,
                                                 gan_critic_weight=0.1),
                 student=StudentOptions(lora_rank=2), critic=CriticOptions(lora_rank=2, gan_head=True))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in pipe.transformer.named_parameters() if "lora_A" in n}
    assert {"to_q", "add_q_proj", "to_add_out", "proj_mlp", "2"} <= adapted  # "2": ff.net.2 / ff_context.net.2
    with torch.no_grad():
        cond, uncond = encode_prompts(pipe, [PROMPT, PROMPT])
    batch = Batch(2, cond=cond, uncond=uncond, real=torch.randn(2, 4, 8, 8), real_cond=cond)
    out = method.training_step(batch, 0)
    assert set(out.losses) == {"generator", "critic"} and all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    groups = method.parameter_groups()
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[g]) for g in groups)
    frozen = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)
