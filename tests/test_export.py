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
from fastgen.lora import add_lora, use_adapter
from fastgen.pipelines.export import export_student, read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.lora import fuse_student, save_lora_weights
from fastgen.pipelines.sampler import student_timesteps

PROMPTS = ["a photo of a sneaker", "a photo of a ankle boot", "a photo of a bag"]
STEPS = (1, 2, 4)

# Runs in a fresh interpreter that imports diffusers only; fastgen must not be importable-by-accident.
DIFFUSERS_ONLY = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    jobs = json.load(open(sys.argv[1]))
    out = {}
    for i, job in enumerate(jobs):
        pipe = DiffusionPipeline.from_pretrained(job["folder"])
        if job.get("lora"):
            pipe.load_lora_weights(job["lora"])
        kwargs = dict(job["kwargs"], generator=torch.Generator().manual_seed(job["seed"]), output_type="np")
        out[str(i)] = pipe(**kwargs).images
    assert "fastgen" not in sys.modules, "the exported pipeline imported fastgen"
    np.savez(sys.argv[2], **out)
""")


def run_diffusers_only(tmp_path, jobs):
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    script = tmp_path / "load.py"
    script.write_text(DIFFUSERS_ONLY)
    result = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, str(script), str(spec), str(result)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(result)
    return [torch.from_numpy(data[str(i)]).permute(0, 3, 1, 2) for i in range(len(jobs))]


@pytest.fixture(scope="module")
def teachers():
    return {name: DiffusionPipeline.from_pretrained(zoo.path(name)) for name in zoo.names()}


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
        for n in STEPS:
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


def test_lora_student_round_trip(teachers, tmp_path):
    """A LoRA student exported fused, and as a LoRA file on the teacher, gives fastgen's images."""
    pipe = teachers["fmnist-ldm"]
    unet = type(pipe.unet).from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    # attention and conv targets together, with lora_alpha != r: both are classic export pitfalls
    add_lora(unet, "student", rank=4, alpha=8, init_lora_weights=False)
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
        {"folder": str(teacher_dir), "lora": str(lora_dir), "kwargs": kwargs, "seed": 7}])
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
    with pytest.raises(ValueError, match="custom timesteps"):  # DDPMPipeline.__call__ has no `timesteps`
        export_student(teachers["digits-ddpm"], tmp_path / "x", timesteps=[625, 300])
    pipe = teachers["fmnist-ldm"]
    folder = export_student(pipe, tmp_path / "sid", timesteps=[625, 300], method="sid")
    meta = read_metadata(folder)
    assert meta["call"] == "timesteps=[625, 300], guidance_scale=0.0" and meta["method"] == "sid"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"] == 1000
    reloaded = DiffusionPipeline.from_pretrained(folder)
    assert reloaded.scheduler.config["fastgen"]["timesteps"] == [625, 300]  # extra keys survive loading


def test_ddpm_pipeline_student_starting_below_T(teachers, tmp_path):
    """DDPMPipeline has no `timesteps` argument: a student trained at [749] or [749, 374] is exported with the
    teacher's betas cut at 750, whose set_timesteps(N) starts there; plain diffusers reproduces fastgen."""
    pipe = teachers["digits-ddpm"]
    jobs, expected = [], []
    for timesteps in ([749], [749, 374]):
        folder = export_student(pipe, tmp_path / f"cut{len(timesteps)}", timesteps=timesteps, method="test")
        config = DiffusionPipeline.from_pretrained(folder).scheduler.config
        assert config["num_train_timesteps"] == 750 and read_metadata(folder)["call"] == f"num_inference_steps={len(timesteps)}"
        jobs.append({"folder": str(folder), "kwargs": {"batch_size": 3, "num_inference_steps": len(timesteps)}, "seed": 3})
        expected.append(fastgen_images(pipe, None, timesteps, "multistep", None, 3, False))
    for got, want in zip(run_diffusers_only(tmp_path, jobs), expected):
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)
