"""Every teacher family fastgen distils, end to end: a tiny pipeline built from diffusers' own classes and saved with
``save_pretrained`` is distilled a few steps by the generic recipes (DMD2, SiD and a consistency method: LCM for
text-conditional teachers, CD for unconditional ones), exported, and loaded in a fresh interpreter that imports only
diffusers, whose plain call -- the line of the folder's README.md, run as written -- gives fastgen's sampler's images.

The families listed in README.md's "Your own diffusers teacher" are exactly these."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import save_tiny_ddpm, tiny_sd_pipeline, tiny_sdxl_pipeline
from diffusers import DiffusionPipeline
from PIL import Image

from fastgen.pipelines.export import read_metadata
from fastgen.pipelines.generate import PipelineSampler
from fastgen.train.runner import run_training

README_PROMPT = "a photo of a sneaker"  # the prompt of the README's example call
# family -> (builder of the teacher folder, the generic recipes it is distilled with)
FAMILIES = {
    "sd-eps": (lambda folder: tiny_sd_pipeline(folder, "epsilon").save_pretrained(folder),
               ["dmd2_1step", "sid_1step", "lcm_4step"]),
    "sd-v": (lambda folder: tiny_sd_pipeline(folder, "v_prediction").save_pretrained(folder),
             ["dmd2_4step", "sid_1step", "lcm_4step"]),
    "sdxl": (lambda folder: tiny_sdxl_pipeline(folder).save_pretrained(folder),
             ["dmd2_4step", "sid_1step", "lcm_4step"]),
    "ddpm": (save_tiny_ddpm, ["dmd2_1step", "sid_1step", "cd_4step"]),
}

# A fresh interpreter with diffusers only: for each folder, the README's python block, run as written (the folder's
# path put in; the image kept as an array, not a PIL image, so that it can be compared to 1e-5).
README_RUNNER = textwrap.dedent("""
    import json, re, sys
    import numpy as np
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()
    out = {}
    for i, folder in enumerate(json.load(open(sys.argv[1]))):
        block = re.search(r"```python\\n(.*?)```", open(folder + "/README.md").read(), re.S).group(1)
        block = block.replace("path/to/this/folder", folder).replace(").images[0]", ', output_type="np").images[0]')
        scope = {}
        exec(block, scope)
        out[str(i)] = scope["image"]
    assert "fastgen" not in sys.modules, "the exported pipeline imported fastgen"
    np.savez(sys.argv[2], **out)
""")


def run_readme_calls(tmp_path, folders) -> list[np.ndarray]:
    spec, script, result = tmp_path / "folders.json", tmp_path / "readme_runner.py", tmp_path / "images.npz"
    spec.write_text(json.dumps([str(f) for f in folders]))
    script.write_text(README_RUNNER)
    proc = subprocess.run([sys.executable, str(script), str(spec), str(result)], capture_output=True, text=True,
                          cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(result)
    return [data[str(i)] for i in range(len(folders))]


def training_data(root):
    """A prompt file and a folder of real images (random RGB of odd sizes: resized and cropped by the stream)."""
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a sneaker\na photo of a bag\na red dress\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return prompts, images


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_exports_and_its_readme_call_is_fastgens_sampler(tmp_path, family):
    build, recipes = FAMILIES[family]
    teacher_folder = tmp_path / "teacher"
    build(teacher_folder)
    prompts, images = training_data(tmp_path)
    teacher = DiffusionPipeline.from_pretrained(teacher_folder)
    text = hasattr(teacher, "encode_prompt")
    network = "unet"
    students, expected = [], []
    for recipe in recipes:
        overrides = ["train.steps=2", "train.batch_size=2", "train.progress=false", "train.checkpoint_every=0",
                     "optim.generator.warmup_steps=0", "optim.generator.lr=1e-2"]
        overrides += [f"data.prompts={prompts}"] if text else []
        if recipe.startswith(("lcm", "cd")):
            overrides += [f"data.real={images}", "data.num_workers=0"]
        folder = run_training(recipe, overrides, teacher=str(teacher_folder), out=str(tmp_path / recipe))
        student = DiffusionPipeline.from_pretrained(folder)
        trained = getattr(student, network)
        assert not torch.equal(trained.conv_out.weight, getattr(teacher, network).conv_out.weight), recipe
        meta = read_metadata(folder)
        assert meta["recipe"] == recipe and f"{meta['call']}, generator" in (folder / "README.md").read_text()
        gen = torch.Generator().manual_seed(0)
        sampler = PipelineSampler(teacher, trained)
        with torch.no_grad():
            if text:
                images_ = sampler([README_PROMPT], timesteps=meta["timesteps"], guidance_scale=meta["guidance_scale"],
                                  generator=gen)
            else:
                images_ = sampler(batch_size=1, timesteps=meta["timesteps"], generator=gen)
        students.append(folder)
        expected.append(images_[0].permute(1, 2, 0).numpy())
    for recipe, got, want in zip(recipes, run_readme_calls(tmp_path, students), expected):
        assert got.shape == want.shape, recipe
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{family} {recipe}")
