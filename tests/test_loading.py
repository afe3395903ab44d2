"""Teacher loading options (dtype, variant, replaced components, single-file checkpoints and their errors,
attention), trained copies in a chosen precision, and gradient checkpointing that leaves the loss and gradients
unchanged."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import tiny_clip, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_vae
from original_layout import ORIGINAL_LAYOUTS, save_original_checkpoint

from fastgen.pipelines.loading import LoadOptions, load_pipeline


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loading") / "sd"
    tiny_sd_pipeline(folder).save_pretrained(folder)
    return folder


def test_dtype_and_variant(sd, tmp_path):
    pipe = load_pipeline(str(sd), options=LoadOptions(dtype="bf16"))
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    variant = tmp_path / "variant"
    load_pipeline(str(sd)).save_pretrained(variant, variant="fp16")
    assert list((variant / "unet").glob("*.fp16.safetensors"))
    loaded = load_pipeline(str(variant), options=LoadOptions(variant="fp16"))
    assert torch.equal(loaded.unet.conv_out.weight, load_pipeline(str(sd)).unet.conv_out.weight)


def test_replaced_and_dropped_components(sd, tmp_path):
    sd3 = tmp_path / "sd3"
    tiny_sd3_pipeline(sd3).save_pretrained(sd3)
    without_t5 = load_pipeline(str(sd3), options=LoadOptions(components={"text_encoder_3": "none"}))
    assert without_t5.text_encoder_3 is None and without_t5.transformer is not None
    torch.manual_seed(5)
    other = tiny_vae()
    other.save_pretrained(tmp_path / "vae")
    pipe = load_pipeline(str(sd), options=LoadOptions(components={"vae": str(tmp_path / "vae")}))
    assert torch.equal(pipe.vae.decoder.conv_out.weight, other.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="the pipeline has no component 'vea'"):
        load_pipeline(str(sd), options=LoadOptions(components={"vea": str(tmp_path / "vae")}))


@pytest.mark.parametrize("options, file, message", [
    (LoadOptions(dtype="fp8"), None, "dtype must be one of fp32, fp16, bf16, not 'fp8'"),
    (LoadOptions(attention="flash"), None, "attention must be one of sdpa, xformers"),
    (LoadOptions(), "model.safetensors", "is a single-file checkpoint: give the diffusers pipeline folder"),
    (LoadOptions(), "model.ckpt", "is a pickled checkpoint (.ckpt)"),
    (LoadOptions(single_file_config="/no/such/folder"), "model.safetensors", "is not a diffusers pipeline folder"),
])
def test_bad_options_are_one_line_errors(sd, tmp_path, options, file, message):
    target = str(sd)
    if file is not None:
        (tmp_path / file).write_bytes(b"")
        target = str(tmp_path / file)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_pipeline(target, options=options)
    assert len(str(err.value).splitlines()) == 1


def sdxl_with_two_widths(folder, seed: int = 0):
    """``tiny_sdxl_pipeline`` with its second text encoder 16 wide (the first stays 8; the UNet attends over 8 + 16),
    as real SDXL's are (768 and 1280): diffusers tells the two CLIP encoders of a single file apart by width only
    (``create_diffusers_clip_model_from_ldm`` gives ``conditioner.embedders.0`` to every encoder of its width)."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_sdxl_pipeline(folder, seed=seed)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 24})
    wide = tiny_clip(pipe.tokenizer, projection=True, hidden_size=16)
    return type(pipe)(**{**pipe.components, "unet": unet.eval(), "text_encoder_2": wide.eval()})


def seeded_sd3_pipeline(folder, seed: int = 0):
    torch.manual_seed(seed)
    return tiny_sd3_pipeline(folder)


SD3_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# family -> (tiny pipeline builder (folder, seed), the networks the file lacks, given from the config folder with
# --component NAME=FOLDER: diffusers' from_single_file takes none from the folder, see test_single_files_as_components)
SINGLE_FILE_FAMILIES = {
    "sd15": (lambda folder, seed: tiny_sd_pipeline(folder, seed=seed), ()),
    "sdxl": (sdxl_with_two_widths, ()),
    "sd3": (seeded_sd3_pipeline, SD3_TEXT_ENCODERS),  # transformer and VAE in the file, as in sd3_medium.safetensors
}


def converted_by_diffusers(module, name, checkpoint, config) -> dict:
    """``module``'s weights as diffusers converts them from a single file's tensors: the checkpoint mapping function
    of ``from_single_file`` for the module's class (diffusers' own models), else
    ``create_diffusers_clip_model_from_ldm`` with the configs of the folder ``config`` (CLIP text encoders)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    checkpoint = dict(checkpoint)  # SD3's converter pops what it converts
    mapping = SINGLE_FILE_LOADABLE_CLASSES.get(type(module).__name__)
    if mapping is not None:
        return mapping["checkpoint_mapping_fn"](checkpoint=checkpoint, config=module.config)
    clip = create_diffusers_clip_model_from_ldm(type(module), checkpoint, config=str(config), subfolder=name)
    return clip.state_dict()


def assert_weights(got: dict, want: dict, other: dict, what: str) -> None:
    """``got`` holds exactly ``want``'s weights, and so not ``other``'s (a pipeline of another seed)."""
    assert got.keys() == want.keys(), what
    assert all(torch.equal(got[k], want[k]) for k in want), what
    assert any(not torch.equal(got[k], other[k]) for k in other), what


def networks(pipe) -> dict:
    return {name: m.state_dict() for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def assert_sources(pipe, in_file, file_weights: dict, folder_weights: dict, trained: str = "") -> None:
    """Each network of ``pipe`` named in ``in_file`` holds the file's weights, every other the folder's; the
    ``trained`` one holds neither its start's."""
    for name, got in networks(pipe).items():
        want, other = (file_weights, folder_weights) if name in in_file else (folder_weights, file_weights)
        if name == trained:
            assert any(not torch.equal(got[k], want[name][k]) for k in got), f"{name} not trained"
        else:
            assert_weights(got, want[name], other[name], name)


@pytest.mark.parametrize("family", list(SINGLE_FILE_FAMILIES))
def test_single_file_checkpoint_in_the_original_layout_is_converted_trained_and_exported(tmp_path, family):
    """A single file in the family's original layout (tests/original_layout.py; SD1.x: UNet, VAE, CLIP; SDXL: UNet,
    VAE, CLIP, OpenCLIP; SD3: transformer and VAE), of a pipeline whose weights differ from the config folder's:
    diffusers' own converters give the source's weights back; loaded through fastgen with the folder's configs, every
    network in the file holds the file's weights and every other the folder's; DMD2 trains on it and exports a
    folder that plain ``from_pretrained`` loads, with those same networks beside the trained one."""
    from diffusers import DiffusionPipeline

    from fastgen.train.runner import run_training

    build, from_folder = SINGLE_FILE_FAMILIES[family]
    config, file = tmp_path / "config", tmp_path / f"{family}-original.safetensors"
    build(config, 0).save_pretrained(config)
    source = build(tmp_path / "source", 1)  # not the weights of the config folder (seed 0)
    written = save_original_checkpoint(source, file)
    in_file = ORIGINAL_LAYOUTS[type(source).__name__]
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for k in written)
    folder, want = networks(load_pipeline(str(config))), networks(source)
    for name in in_file:
        got = converted_by_diffusers(getattr(source, name), name, written, config)
        assert_weights(got, want[name], folder[name], f"{name}, converted by diffusers")
    components = {name: str(config / name) for name in from_folder}
    pipe = load_pipeline(str(file), options=LoadOptions(single_file_config=str(config), components=components))
    assert type(pipe) is type(source) and type(pipe.scheduler) is type(source.scheduler)
    assert set(networks(pipe)) == set(in_file) | set(from_folder)
    assert_sources(pipe, in_file, want, folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dress\na blue bag\n")
    sets = [f"loading.single_file_config={config}", f"data.prompts={prompts}", "train.steps=2", "train.batch_size=2",
            "train.progress=false", "train.checkpoint_every=0", "optim.generator.warmup_steps=0",
            "optim.generator.lr=1e-2"]
    if components:
        sets.append("loading.components={" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in components.items()) + "}")
    out = run_training("dmd2_1step", sets, teacher=str(file), out=str(tmp_path / "run"))
    student = DiffusionPipeline.from_pretrained(out)
    assert_sources(student, in_file, want, folder, trained="unet" if hasattr(source, "unet") else "transformer")
    image = student("a red dress", num_inference_steps=1, guidance_scale=0.0, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_single_files_as_components_and_the_errors_around_them(tmp_path):
    """``--component NAME=FILE``: an SD3 folder teacher whose transformer and VAE are converted from an original-layout
    file (each by its class's ``from_single_file`` with the folder's configs; the way to a transformer-only Flux file
    such as flux1-dev.safetensors, which ``FluxPipeline.from_single_file`` cannot take alone: it loads no network the
    file lacks from the config folder). A single-file teacher with T5 dropped. One-line errors: a single file without
    the text encoders and no --component for them, a file for a component diffusers does not convert, a file without
    that component's weights, a file that is not .safetensors."""
    config, file, transformer = tmp_path / "config", tmp_path / "sd3.safetensors", tmp_path / "transformer.safetensors"
    seeded_sd3_pipeline(config, 0).save_pretrained(config)
    source = seeded_sd3_pipeline(tmp_path / "source", 1)
    save_original_checkpoint(source, file)
    save_original_checkpoint(source, transformer, components=["transformer"])
    (tmp_path / "vae.ckpt").write_bytes(b"")
    folder, want = networks(load_pipeline(str(config))), networks(source)
    pipe = load_pipeline(str(config), options=LoadOptions(components={"transformer": str(file), "vae": str(file)}))
    assert_sources(pipe, ("transformer", "vae"), want, folder)
    clips = {name: str(config / name) for name in SD3_TEXT_ENCODERS[:2]}
    no_t5 = load_pipeline(str(file), options=LoadOptions(single_file_config=str(config),
                                                           components={**clips, "text_encoder_3": "none"}))
    assert no_t5.text_encoder_3 is None and set(networks(no_t5)) == {"transformer", "vae", *clips}
    for target, options, message in [
        (file, LoadOptions(single_file_config=str(config)), "Failed to load CLIPTextModelWithProjection. Weights "
         "for this component appear to be missing in the checkpoint. (the file lacks that network and diffusers does "
         "not take it from the config folder: give it with --component NAME=FOLDER"),
        (config, LoadOptions(components={"text_encoder": str(file)}), "--component text_encoder="
         f"{file}: diffusers converts single files only for its own models (UNet, VAE, transformers), not "
         "CLIPTextModelWithProjection; give a component folder."),
        (config, LoadOptions(components={"vae": str(transformer)}), f"Could not convert --component vae={transformer} "
         f"with the configs of '{config / 'vae'}': Failed to load AutoencoderKL. Weights for this component appear"),
        (config, LoadOptions(components={"vae": str(tmp_path / "vae.ckpt")}), "neither a folder nor a .safetensors"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)) as err:
            load_pipeline(str(target), options=options)
        assert len(str(err.value).splitlines()) == 1


def flux_width_transformer(seed: int):
    """A ``FluxTransformer2DModel`` at FLUX.1's width (24 heads of 128; diffusers' Flux converter splits the single
    blocks' fused ``linear1`` at that width only) with one double and one single block: 530M parameters, made on the
    meta device and drawn straight in bf16 (N(0, 0.02)), 1 GB, so that the test needs seconds, not a minute."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights(include_buffers=True):
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=16,
                                       pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    return model.eval()


def test_flux_transformer_file_in_the_original_layout_as_a_component(tmp_path):
    """A Flux transformer file in Black Forest Labs' layout (as flux1-dev.safetensors: the transformer alone), given to
    a Flux folder teacher as ``--component transformer=FILE`` with ``--dtype bf16``: diffusers' converter gives the
    file's weights back exactly, and the pipeline holds them beside the folder's own text encoders and VAE. The folder
    holds the transformer's config only, so the file is the one source of its weights."""
    import shutil

    from diffusers import FluxPipeline

    config, file = tmp_path / "flux", tmp_path / "flux1-tiny.safetensors"
    folder_pipe = tiny_flux_pipeline(config)
    folder_pipe.save_pretrained(config)
    source = flux_width_transformer(seed=1)
    shutil.rmtree(config / "transformer")
    source.save_config(config / "transformer")
    written = save_original_checkpoint(FluxPipeline(**{**folder_pipe.components, "transformer": source}), file)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "guidance_in.in_layer.weight",
            "final_layer.adaLN_modulation.1.weight"} <= set(written)
    del written
    pipe = load_pipeline(str(config), options=LoadOptions(dtype="bf16", components={"transformer": str(file)}))
    got, want = pipe.transformer.state_dict(), source.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for name, weights in networks(folder_pipe).items():
        if name != "transformer":
            loaded = getattr(pipe, name).state_dict()
            assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in weights.items()), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, xformers may be available")
def test_xformers_on_cpu_falls_back_to_sdpa_and_says_so(sd, capsys):
    default = load_pipeline(str(sd))
    pipe = load_pipeline(str(sd), options=LoadOptions(attention="xformers"))
    err = capsys.readouterr().err
    assert "attention 'xformers' needs a CUDA device" in err and "scaled-dot-product attention" in err
    assert len(err.strip().splitlines()) == 1
    processors = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    assert processors == {k: type(v).__name__ for k, v in default.unet.attn_processors.items()}
    assert "XFormersAttnProcessor" not in processors.values()


LORA = ["student.lora_rank=4", "critic.lora_rank=4"]  # equal ranks: recomputing the wrong adapter raises nothing


@pytest.mark.parametrize("recipe, sets, networks", [
    ("dmd2_4step", ["dmd2.guidance_scale=2.0"], 3),  # the frozen teacher (run without gradients), student, critic
    ("dmd2_4step", ["dmd2.guidance_scale=2.0", *LORA], 1),  # the one base under teacher, student and critic
    ("sid_1step", ["sid.guidance_scale=2.0", *LORA], 1),  # SiD's generator loss backpropagates through all three
    ("sid_1step", ["sid.guidance_scale=2.0"], 3),  # ... through the frozen teacher and the critic with its weights frozen
])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(sd, recipe, sets, networks):
    from fastgen.methods import Batch
    from fastgen.pipelines.generate import denoiser_from_pipeline, encode_prompts
    from fastgen.train.recipes import load_recipe
    from fastgen.train.runner import build_method, enable_gradient_checkpointing, load_teacher, resolve_timesteps

    results = []
    for checkpointing in (False, True):
        pipe = load_teacher(str(sd))  # fresh: LoRA methods add their adapters to the teacher's network
        cfg = load_recipe(recipe, sets)
        torch.manual_seed(0)
        method = build_method(cfg, pipe, resolve_timesteps(cfg, pipe, denoiser_from_pipeline(pipe).schedule))
        for name, param in method.named_parameters():  # adapters that are not the identity, each its own
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
        if checkpointing:
            assert enable_gradient_checkpointing(method) == networks
        with torch.no_grad():
            cond, uncond = encode_prompts(pipe, ["a red dress", "a blue bag"])
        batch = Batch(2, cond=cond, uncond=uncond)
        torch.manual_seed(1)
        losses = method.training_step(batch, 0).losses
        total = sum(losses.values())
        total.backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        results.append((float(total), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def test_bf16_teacher_with_fp32_trained_copies_under_mixed_precision(sd, tmp_path):
    """A fresh process (accelerate's mixed precision is per process): a bf16 teacher, fp32 student and critic under
    bf16 autocast, gradient checkpointing; the exported folder is in the teacher's dtype and runs."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dress\n")
    cmd = [sys.executable, "-m", "fastgen.cli", "train", "dmd2_1step", "--teacher", str(sd), "--out",
           str(tmp_path / "run"), "--dtype", "bf16", "--prompts", str(prompts), "--set", "train.steps=2", "--set",
           "train.batch_size=2", "--set", "train.checkpoint_every=0", "--set", "train.mixed_precision=bf16", "--set",
           "train.gradient_checkpointing=true", "--set", "train.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["loading"]["dtype"] == "bf16" and recipe["train"]["trained_dtype"] == "fp32"
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["mixed_precision"] == "bf16"
    student = load_pipeline(str(tmp_path / "run" / "student"), options=LoadOptions(dtype="bf16"))
    assert student.unet.dtype == torch.bfloat16
    image = student("a red dress", num_inference_steps=1, guidance_scale=0.0, output_type="pt").images
    assert torch.isfinite(image).all()


def test_revision_picks_that_snapshot_of_a_hub_id_from_the_offline_cache(sd, tmp_path, monkeypatch):
    """``revision`` reaches the hub loader: a hub cache laid out as huggingface_hub writes it (refs/<revision> naming
    a snapshot) holds two revisions of one repository, and offline each revision loads its own weights."""
    import shutil

    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    other = load_pipeline(str(sd))
    with torch.no_grad():
        other.unet.conv_out.weight.add_(1.0)
    for revision, commit, source in (("main", "a" * 40, None), ("v2", "b" * 40, other)):
        snapshot = repo / "snapshots" / commit
        if source is None:
            shutil.copytree(sd, snapshot)
        else:
            source.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    main = load_pipeline("someone/tiny-sd")
    v2 = load_pipeline("someone/tiny-sd", options=LoadOptions(revision="v2"))
    assert torch.equal(main.unet.conv_out.weight, load_pipeline(str(sd)).unet.conv_out.weight)
    assert torch.equal(v2.unet.conv_out.weight, other.unet.conv_out.weight)
