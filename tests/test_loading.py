"""Teacher loading options (dtype, variant, replaced components, single-file checkpoints and their errors,
attention), trained copies in a chosen precision, and gradient checkpointing that leaves the loss and gradients
unchanged."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_vae
from original_layout import save_original_sd_checkpoint

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


def test_single_file_checkpoint_in_the_original_layout_is_converted_trained_and_exported(sd, tmp_path):
    """An SD1.x single file in the original (LDM) layout -- UNet, VAE and CLIP text encoder of a pipeline whose
    weights differ from the config folder's -- is converted by diffusers' ``from_single_file`` with the folder's
    configs: every component holds the file's weights, none the folder's; DMD2 trains on it and exports a folder
    that plain ``from_pretrained`` loads, with the file's VAE and text encoder."""
    from diffusers import DiffusionPipeline

    from fastgen.train.runner import run_training

    source = tiny_sd_pipeline(tmp_path / "source", seed=1)  # not the weights of the config folder `sd` (seed 0)
    file = tmp_path / "sd15-original.safetensors"
    written = save_original_sd_checkpoint(source, file)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in written)
    folder_pipe = load_pipeline(str(sd))
    pipe = load_pipeline(str(file), options=LoadOptions(single_file_config=str(sd)))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler) is type(folder_pipe.scheduler)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(source, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert not torch.equal(next(iter(got.values())), next(iter(getattr(folder_pipe, name).state_dict().values())))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dress\na blue bag\n")
    out = run_training("dmd2_1step", [f"loading.single_file_config={sd}", f"data.prompts={prompts}", "train.steps=2",
                                      "train.batch_size=2", "train.progress=false", "train.checkpoint_every=0",
                                      "optim.generator.warmup_steps=0", "optim.generator.lr=1e-2"],
                       teacher=str(file), out=str(tmp_path / "run"))
    student = DiffusionPipeline.from_pretrained(out)
    assert not torch.equal(student.unet.conv_out.weight, source.unet.conv_out.weight)  # trained
    assert torch.equal(student.vae.decoder.conv_out.weight, source.vae.decoder.conv_out.weight)
    assert torch.equal(student.text_encoder.get_input_embeddings().weight,
                       source.text_encoder.get_input_embeddings().weight)
    image = student("a red dress", num_inference_steps=1, guidance_scale=0.0, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


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
