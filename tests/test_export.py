"""Exported students load with plain diffusers (without fastgen) and reproduce fastgen's sampler."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from fastgen import zoo
from fastgen.lora import DEFAULT_UNET_TARGETS, add_lora, use_adapter
from fastgen.pipelines.export import export_student, exported_scheduler, read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.lora import fuse_student, save_lora_weights
from fastgen.pipelines.sampler import student_timesteps
from fastgen.train.recipes import load_recipe

PROMPTS = ["a photo of a sneaker", "a photo of a ankle boot", "a photo of a bag"]
STEPS = (1, 2, 4)

# Runs in a fresh interpreter that imports diffusers only; fastgen must not be importable-by-accident. Progress
# bars are switched off (a user's choice), so that anything else on stdout / stderr is a warning of the load or call.
DIFFUSERS_ONLY = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    jobs = json.load(open(sys.argv[1]))
    out = {}
    for i, job in enumerate(jobs):
        pipe = DiffusionPipeline.from_pretrained(job["folder"])
        if job.get("lora"):
            pipe.load_lora_weights(job["lora"])
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(job["kwargs"], generator=torch.Generator().manual_seed(job["seed"]), output_type="np")
        out[str(i)] = pipe(**kwargs).images
    assert "fastgen" not in sys.modules, "the exported pipeline imported fastgen"
    np.savez(sys.argv[2], **out)
""")


def run_diffusers_only(tmp_path, jobs, quiet=True):
    """Images of each job, made in a fresh interpreter that imports diffusers only; with ``quiet``, it must print
    nothing (``load_lora_weights`` of a UNet-only LoRA file logs that the text encoder has no LoRA keys)."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    script = tmp_path / "load.py"
    script.write_text(DIFFUSERS_ONLY)
    result = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, str(script), str(spec), str(result)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stderr + proc.stdout
    assert not quiet or printed == "", f"loading or calling an exported folder printed:\n{printed}"
    data = np.load(result)
    return [torch.from_numpy(data[str(i)]).permute(0, 3, 1, 2) for i in range(len(jobs))]


@pytest.fixture(scope="module")
def teachers():
    return {name: DiffusionPipeline.from_pretrained(zoo.path(name)) for name in ("digits-ddpm", "fmnist-ldm")}


def fastgen_images(pipe, model, timesteps, sampler, guidance, seed, text):
    gen = torch.Generator().manual_seed(seed)
    runner = PipelineSampler(pipe, model)
    if text:
        return runner(PROMPTS, timesteps=timesteps, sampler=sampler, guidance_scale=guidance, generator=gen)
    return runner(batch_size=3, timesteps=timesteps, sampler=sampler, generator=gen)


@pytest.mark.parametrize("sampler", ["multistep", "ddim"])
def test_exported_students_reproduce_fastgen_sampler(teachers, tmp_path, sampler):
    jobs, expected = [], []
    for name, pipe in teachers.items():
        text = name == "fmnist-ldm"
        # the student: a perturbed copy of the teacher network (a real model that is not the teacher)
        student = type(pipe.unet).from_config(pipe.unet.config)
        student.load_state_dict(pipe.unet.state_dict())
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        for n in STEPS + ((3, 6) if sampler == "ddim" else ()):  # DDIM: also N that does not divide T = 1000
            timesteps = student_timesteps(PipelineSampler(pipe).denoiser.schedule, n, sampler)
            folder = export_student(pipe, tmp_path / f"{name}-{sampler}-{n}", model=student, timesteps=timesteps,
                                    sampler=sampler, method="test", guidance_scale=0.0)
            assert read_metadata(folder)["timesteps"] == timesteps
            assert "num_inference_steps" in (folder / "README.md").read_text()
            kwargs = {"num_inference_steps": n}
            if text:
                kwargs.update(prompt=PROMPTS, guidance_scale=0.0)
            else:
                kwargs.update(batch_size=3)
            jobs.append({"folder": str(folder), "kwargs": kwargs, "seed": 10 + n})
            expected.append(fastgen_images(pipe, student, timesteps, sampler, None, 10 + n, text))
    if sampler == "multistep":  # a guided student call: CFG in the exported pipeline == CFG in fastgen
        pipe = teachers["fmnist-ldm"]
        timesteps = student_timesteps(PipelineSampler(pipe).denoiser.schedule, 2)
        folder = export_student(pipe, tmp_path / "guided", timesteps=timesteps, guidance_scale=2.0)
        jobs.append({"folder": str(folder), "kwargs": {"prompt": PROMPTS, "num_inference_steps": 2,
                                                       "guidance_scale": 2.0}, "seed": 5})
        expected.append(fastgen_images(pipe, None, timesteps, sampler, 2.0, 5, True))
    for got, want in zip(run_diffusers_only(tmp_path, jobs), expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)


def test_ddim_student_timesteps_are_the_exported_schedulers_for_every_n(teachers):
    """student_timesteps(N, "ddim") for N = 1..64: the exported DDIMScheduler's set_timesteps(N) (no custom call), on
    whose grid its step t -> t - T'//N lands on the next timestep (the last one past the end, x0), so the plain call
    runs fastgen's sample_ddim; for N dividing T = 1000 diffusers' plain trailing grid itself."""
    from diffusers import DDIMScheduler

    pipe = teachers["digits-ddpm"]
    schedule = PipelineSampler(pipe).denoiser.schedule
    plain = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    for n in range(1, 65):
        timesteps = student_timesteps(schedule, n, "ddim")
        scheduler, custom = exported_scheduler(pipe, timesteps, "ddim")
        top = scheduler.config.num_train_timesteps
        assert not custom and timesteps[0] == top - 1 and top > 1000 - n, n
        assert [t - top // n for t in timesteps] == timesteps[1:] + [-1], n
        plain.set_timesteps(n)
        assert (timesteps == plain.timesteps.tolist()) == (1000 % n == 0), n
    with pytest.raises(ValueError, match="exceeds the teacher's 1000 timesteps"):
        student_timesteps(schedule, 1001, "ddim")


# every layer with weights, as the shipped every-layer LoRA recipe lists them (student.lora_targets): the default
# targets plus the transformer blocks' feed-forward, the resampling convolutions, conv_in/out and the time embedding
ALL_UNET_LAYERS = tuple(load_recipe("sid_fmnist_1step_lora").student.lora_targets)


@pytest.mark.parametrize("targets", [None, ALL_UNET_LAYERS], ids=["default", "every-layer"])
def test_lora_student_round_trip(teachers, tmp_path, targets):
    """A LoRA student exported fused, and as a LoRA file on the teacher, gives fastgen's images."""
    pipe = teachers["fmnist-ldm"]
    unet = type(pipe.unet).from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    # attention and conv targets together, with lora_alpha != r: both are classic export pitfalls
    add_lora(unet, "student", rank=4, alpha=8, init_lora_weights=False, target_modules=targets)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n}
    assert ("conv_in" in adapted and "time_embedding.linear_2" in adapted) == (targets is not None)
    if targets is not None:  # the recipe's every-layer list keeps the default targets
        assert set(DEFAULT_UNET_TARGETS) < set(targets)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    timesteps = student_timesteps(PipelineSampler(pipe).denoiser.schedule, 4)
    with use_adapter(unet, "student"):
        expected = fastgen_images(pipe, unet, timesteps, "multistep", None, 7, True)
    with use_adapter(unet, None):
        teacher_out = fastgen_images(pipe, unet, timesteps, "multistep", None, 7, True)
    assert (expected - teacher_out).abs().max() > 1e-2  # the adapter really changes the output

    fused = fuse_student(unet, "student")
    assert not any("lora" in n for n, _ in fused.named_parameters())
    fused_dir = export_student(pipe, tmp_path / "fused", model=fused, timesteps=timesteps, method="lora-test")
    lora_dir = save_lora_weights(StableDiffusionPipeline, unet, tmp_path / "lora", "student")
    teacher_dir = export_student(pipe, tmp_path / "base", timesteps=timesteps, method="lora-base")
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": 0.0}
    got_fused, got_lora = run_diffusers_only(tmp_path, [
        {"folder": str(fused_dir), "kwargs": kwargs, "seed": 7},
        {"folder": str(teacher_dir), "lora": str(lora_dir), "kwargs": kwargs, "seed": 7}], quiet=False)
    torch.testing.assert_close(got_fused, expected.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_lora, expected.float(), atol=1e-4, rtol=0)


def test_export_rejects_bad_input(teachers, tmp_path):
    pipe = teachers["digits-ddpm"]
    with pytest.raises(ValueError, match="out of range"):
        export_student(pipe, tmp_path / "a", timesteps=[1000, 500])
    with pytest.raises(ValueError, match="descending"):
        export_student(pipe, tmp_path / "b", timesteps=[249, 999])
    with pytest.raises(ValueError, match="evenly spaced"):
        export_student(pipe, tmp_path / "c", timesteps=[999, 666, 332], sampler="ddim")
    unet = type(pipe.unet).from_config(pipe.unet.config)
    add_lora(unet, "student", rank=2, target_modules=("conv1",))
    with pytest.raises(ValueError, match="fuse"):
        export_student(pipe, tmp_path / "d", model=unet, timesteps=[999])


def test_custom_timesteps_are_written_into_the_call(teachers, tmp_path):
    """Timesteps no set_timesteps(N) gives are passed as timesteps=, for text and unconditional students alike."""
    jobs, expected = [], []
    for name, pipe in teachers.items():
        text = name == "fmnist-ldm"
        folder = export_student(pipe, tmp_path / name, timesteps=[625, 300], method="sid")
        meta = read_metadata(folder)
        assert meta["method"] == "sid" and meta["timesteps"] == [625, 300]
        # the schedule is cut at 626 with a grid of every timestep: LCM's own checks accept the call unwarned
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"] == 626
        if text:
            assert meta["call"] == "timesteps=[625, 300], guidance_scale=0.0"
            kwargs = {"prompt": PROMPTS, "timesteps": [625, 300], "guidance_scale": 0.0}
        else:  # ConsistencyModelPipeline: num_inference_steps=None, or it warns that both were given
            assert meta["call"] == "num_inference_steps=None, timesteps=[625, 300]"
            kwargs = {"batch_size": 3, "num_inference_steps": None, "timesteps": [625, 300]}
        jobs.append({"folder": str(folder), "kwargs": kwargs, "seed": 4})
        expected.append(fastgen_images(pipe, None, [625, 300], "multistep", None, 4, text))
    for got, want in zip(run_diffusers_only(tmp_path, jobs), expected):
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)


def lcm_steps(t0: int, n: int) -> list[int]:
    """What docs/export.md says N steps run on a student whose first trained timestep is t0 (grid k = 1)."""
    return [t0 - (i * (t0 + 1)) // n for i in range(n)]


def test_every_step_count_runs_and_is_fastgen_sampler(teachers, tmp_path):
    """The default call (50 steps for Stable Diffusion, 1 for the unconditional ConsistencyModelPipeline) and any
    N up to t0 + 1 (tested to 50) run on 1- and 4-step students, as fastgen's multistep sampler on the timesteps
    docs/export.md gives; the trained N gives the trained timesteps."""
    jobs, expected = [], []
    sd, digits = teachers["fmnist-ldm"], teachers["digits-ddpm"]
    for trained in ([749], [999, 749, 499, 249]):
        folder = export_student(sd, tmp_path / f"sd{len(trained)}", timesteps=trained, method="dmd2")
        for n in sorted({len(trained), 1, 2, 4, 50}):
            assert len(trained) != n or lcm_steps(trained[0], n) == trained
            kwargs = {"prompt": PROMPTS, "guidance_scale": 0.0}
            if n != 50:  # 50 is StableDiffusionPipeline's default: the plain pipe(prompt) call
                kwargs["num_inference_steps"] = n
            jobs.append({"folder": str(folder), "kwargs": kwargs, "seed": n})
            expected.append(fastgen_images(sd, None, lcm_steps(trained[0], n), "multistep", None, n, True))
    folder = export_student(digits, tmp_path / "digits", timesteps=[749], method="dmd2")
    for n in (1, 4, 50):
        kwargs = {"batch_size": 3} if n == 1 else {"batch_size": 3, "num_inference_steps": n}  # 1: the default
        jobs.append({"folder": str(folder), "kwargs": kwargs, "seed": n})
        expected.append(fastgen_images(digits, None, lcm_steps(749, n), "multistep", None, n, False))
    for job, got, want in zip(jobs, run_diffusers_only(tmp_path, jobs), expected):
        # LCM's boundary scaling c_skip = 0.25 / (0.25 + (10 t)^2) weighs x_t into the last x0 (1.3e-5 at t = 14,
        # the last of 50 steps from 749), where fastgen takes x0 itself: within the tolerance up to t >= 1
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0, msg=lambda m: f"{job}: {m}")


def test_default_call_returns_an_image_for_every_kind_of_student(teachers, tmp_path):
    """`pipe(prompt)` / `pipe()` with no other argument, in a fresh diffusers-only process that prints nothing:
    LCM (1 and 4 steps, cut schedule, custom timesteps), DDIM and LoRA-fused students of both zoo teachers."""
    sd, digits = teachers["fmnist-ldm"], teachers["digits-ddpm"]
    lora = type(sd.unet).from_config(sd.unet.config)
    lora.load_state_dict(sd.unet.state_dict())
    add_lora(lora, "student", rank=2, init_lora_weights=False)
    kinds = [(sd, [749], "multistep", None), (sd, [999, 749, 499, 249], "multistep", None),
             (sd, [249], "multistep", None), (sd, [625, 300], "multistep", None),
             (sd, [999, 749, 499, 249], "ddim", None), (sd, [749], "multistep", fuse_student(lora, "student")),
             (digits, [749], "multistep", None), (digits, [249], "multistep", None),
             (digits, [999, 749, 499, 249], "ddim", None)]
    # a consistency student on a grid coarser than the default 50 steps (skip 40: O = 25): the default call must run
    kinds.append((sd, [999, 759, 519, 279], "multistep", None))
    grids = {len(kinds) - 1: {"original_inference_steps": 25}}
    jobs = []
    for i, (pipe, timesteps, sampler, model) in enumerate(kinds):
        folder = export_student(pipe, tmp_path / str(i), model=model, timesteps=timesteps, sampler=sampler,
                                scheduler_config=grids.get(i))
        jobs.append({"folder": str(folder), "kwargs": {"prompt": PROMPTS[0]} if pipe is sd else {}, "seed": i})
    for (pipe, *_), images in zip(kinds, run_diffusers_only(tmp_path, jobs)):
        assert images.shape == ((1, 1, 32, 32) if pipe is sd else (1, 1, 8, 8)) and torch.isfinite(images).all()


def test_model_card_and_metadata(teachers, tmp_path):
    """Card YAML: base_model only for a hub teacher, the teacher's license, pipeline_tag; no local path anywhere."""
    from huggingface_hub import ModelCard

    sd, digits = teachers["fmnist-ldm"], teachers["digits-ddpm"]
    zoo_student = export_student(sd, tmp_path / "zoo", timesteps=[749], method="dmd2", guidance_scale=0.0)
    data = ModelCard.load(zoo_student / "README.md").data
    assert (data.library_name, data.pipeline_tag, data.license) == ("diffusers", "text-to-image", "apache-2.0")
    assert data.base_model is None and {"fastgen", "distillation", "dmd2"} <= set(data.tags)
    text = (zoo_student / "README.md").read_text() + (zoo_student / "fastgen.json").read_text()
    assert str(zoo.path("fmnist-ldm").parent) not in text and str(tmp_path) not in text
    assert "pypi.org/project/fastgen/" not in text and "fastgen-diffusion" in text
    assert read_metadata(zoo_student)["teacher"] == "fmnist-ldm"
    # a teacher loaded from the hub: its id is the base model; its license is unknown offline
    hub = StableDiffusionPipeline(**sd.components)
    hub.register_to_config(_name_or_path="some-org/tiny-sd")
    hub_student = export_student(hub, tmp_path / "hub", timesteps=[749], method="dmd2")
    data = ModelCard.load(hub_student / "README.md").data
    assert data.base_model == "some-org/tiny-sd" and data.license == "other"
    assert read_metadata(hub_student)["teacher"] == "some-org/tiny-sd"
    data = ModelCard.load(export_student(digits, tmp_path / "digits", timesteps=[749]) / "README.md").data
    assert data.pipeline_tag == "unconditional-image-generation"
    snapshot = tmp_path / "hub" / "models--some-org--tiny-ddpm" / "snapshots" / "0123abc"  # a hub cache folder
    digits.save_pretrained(snapshot)
    cached = DiffusionPipeline.from_pretrained(snapshot)
    data = ModelCard.load(export_student(cached, tmp_path / "cached", timesteps=[749]) / "README.md").data
    assert data.base_model == "some-org/tiny-ddpm" and read_metadata(tmp_path / "cached")["teacher"] == data.base_model


def test_folder_loads_with_transformers_4_files(teachers, tmp_path):
    """transformers 5 saves CLIPTokenizer as tokenizer.json only and a config-built CLIPTextModel without the
    `text_model.` key prefix; transformers 4.x needs vocab.json / merges.txt and the prefix (docs/export.md)."""
    import shutil

    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = export_student(teachers["fmnist-ldm"], tmp_path / "s", timesteps=[749])
    slow_files = tmp_path / "tokenizer-files"
    slow_files.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / "tokenizer" / name, slow_files / name)
    ours, theirs = CLIPTokenizer.from_pretrained(slow_files), CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert ours(PROMPTS).input_ids == theirs(PROMPTS).input_ids  # the files hold the whole vocabulary
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(key.startswith("text_model.") for key in f.keys())
    reloaded = CLIPTextModel.from_pretrained(folder / "text_encoder")
    for key, value in teachers["fmnist-ldm"].text_encoder.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
