"""Every shipped template recipe (train/recipes/*_template.toml, full-size GPU setups) passes the runner's checks on a
tiny stand-in teacher of its family, given the keys its header's command sets (`--set KEY=...`: the user's prompts
and images, replaced by stand-ins): the teacher is loaded, the method, trainer and data are built, nothing is trained.
Without a key it documents, the run stops with the one-line error that names it."""

import re

import pytest
import torch
from conftest import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from PIL import Image

from fastgen.train import recipes
from fastgen.train.recipes import load_recipe
from fastgen.train.runner import build_data, build_run

TEMPLATES = sorted(name for name in recipes.available_recipes() if name.endswith("_template"))
STAND_INS = {"sd15": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline,  # the family in the
             "flux": tiny_flux_pipeline}  # template's name


def header_keys(name: str) -> list[str]:
    """The recipe keys the template's header command sets (``--set KEY=VALUE``)."""
    text = recipes.recipe_path(name).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    return re.findall(r"--set\s+([\w.]+)=", header)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """``(teachers {family: folder}, {key: stand-in value})``: tiny teachers, a prompt file, an image folder."""
    root = tmp_path_factory.mktemp("templates")
    teachers = {}
    for family, build in STAND_INS.items():
        build(root / family).save_pretrained(root / family)
        teachers[family] = root / family
    (root / "prompts.txt").write_text("a photo of a sneaker\na photo of a bag\n")
    (root / "images").mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(24, 20, 3) * 255).byte().numpy()).save(root / "images" / f"{i}.png")
    return teachers, {"data.prompts": str(root / "prompts.txt"), "data.real": str(root / "images")}


def check(name, teachers, overrides, out):
    """The runner's checks on template ``name``: teacher, method, trainer and data built (small batches: the
    stand-in's prompts and images are few; no DataLoader workers on this machine)."""
    # fp32 throughout: the bf16 teacher under bf16 autocast (the headers' `accelerate launch --mixed_precision bf16`)
    # needs accelerate's state made with it, which one pytest process shares (tests/test_loading.py runs that path)
    cfg = load_recipe(name, [*overrides, "train.batch_size=2", "data.num_workers=0", "train.mixed_precision=no",
                             "loading.dtype=fp32"])
    cfg.teacher = str(teachers[next(family for family in STAND_INS if family in name)])
    pipe, _, method, trainer = build_run(cfg, out, allow_pickle=False, resumed=False, trackers=False)
    build_data(cfg, pipe, method, out, trainer.device).close()


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_passes_the_runners_checks_with_the_keys_its_header_sets(stand_ins, name, tmp_path):
    teachers, values = stand_ins
    keys = header_keys(name)
    assert "data.prompts" in keys  # text-to-image templates of a teacher outside the zoo
    check(name, teachers, [f"{key}={values[key]}" for key in keys], tmp_path)
    shipped = load_recipe(name).flat()
    for key in keys:  # without one of them: the one-line error names it (or the shipped placeholder, prompts.txt)
        names = [re.escape(key)] + ([re.escape(repr(shipped[key]))] if shipped[key] else [])
        with pytest.raises((ValueError, FileNotFoundError), match="|".join(names)):
            check(name, teachers, [f"{k}={values[k]}" for k in keys if k != key], tmp_path / key)


def test_the_sd15_template_trains_data_free_with_the_settings_its_error_names(stand_ins, tmp_path):
    teachers, values = stand_ins
    prompts = [f"data.prompts={values['data.prompts']}"]
    with pytest.raises(ValueError) as error:
        check("dmd2_sd15_template", teachers, prompts, tmp_path)
    message = str(error.value)
    assert "\n" not in message and "needs real images: set data.real to an image folder" in message
    settings = re.search(r"or train without them: (.*) \(data-free", message).group(1)
    overrides = [s.strip().replace(" = ", "=") for s in re.split(r",| and ", settings)]
    assert overrides == ["dmd2.gan_generator_weight=0", "dmd2.gan_critic_weight=0", "critic.gan_head=false"]
    check("dmd2_sd15_template", teachers, prompts + overrides, tmp_path / "free")
