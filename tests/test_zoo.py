"""The zoo: datasets, the byte-level tokenizer, the shipped teachers, teacher training, the CLI."""

import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, DDPMPipeline, StableDiffusionPipeline

from fastgen import zoo
from fastgen.cli import main
from fastgen.train.teachers import build_byte_tokenizer, train_teacher
from fastgen.zoo.data import load_digits, load_fashion_mnist


def test_datasets_are_real_and_scaled():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape == (1497, 1, 8, 8) and xt.shape == (300, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
    f, fy = load_fashion_mnist("test")
    assert f.shape == (10000, 1, 32, 32) and f.min() == -1 and f.max() == 1
    assert torch.all(f[:, :, :2] == -1)  # the 2-pixel padding is background
    assert torch.bincount(fy).tolist() == [1000] * 10
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_missing_fashion_mnist_has_a_clear_error(monkeypatch, tmp_path):
    import fastgen.zoo.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist("train")


def test_byte_tokenizer_holds_every_prompt(tmp_path):
    tok = build_byte_tokenizer(tmp_path / "tok")
    for prompt in zoo.prompts():
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert ids.count(tok.eos_token_id) >= 1 and ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == prompt.replace(" ", "")
    with pytest.raises(ValueError, match="truncate"):
        build_byte_tokenizer(tmp_path / "short", model_max_length=10)


def test_zoo_paths():
    assert zoo.names() == ["digits-ddpm", "fmnist-ldm", "fmnist-flow"]
    assert (zoo.path("fmnist-ldm") / "model_index.json").is_file()
    assert zoo.resolve("digits-ddpm") == str(zoo.path("digits-ddpm"))
    assert zoo.resolve("some/hub-id") == "some/hub-id"
    with pytest.raises(KeyError, match="available"):
        zoo.path("nope")


def test_shipped_teachers_load_with_plain_diffusers():
    digits = DiffusionPipeline.from_pretrained(zoo.path("digits-ddpm"))
    assert isinstance(digits, DDPMPipeline)
    sd = DiffusionPipeline.from_pretrained(zoo.path("fmnist-ldm"))
    assert isinstance(sd, StableDiffusionPipeline)
    assert 0.8e6 < sum(p.numel() for p in sd.unet.parameters()) < 1.5e6
    # the VAE is not the quality floor: test reconstructions are close to the real images
    real = load_fashion_mnist("test")[0][-200:]
    with torch.no_grad():
        recon = sd.vae.decode(sd.vae.encode(real).latent_dist.mode()).sample
    assert torch.mean((recon - real) ** 2) < 0.02
    # latents scaled by the measured factor have roughly unit variance
    with torch.no_grad():
        z = sd.vae.encode(real).latent_dist.mode() * sd.vae.config.scaling_factor
    assert 0.7 < z.std() < 1.3
    total = sum(f.stat().st_size for name in zoo.names() for f in zoo.path(name, check=False).rglob("*.safetensors"))
    assert total < 25e6  # three teachers (fmnist-flow reuses fmnist-ldm's VAE and text encoder: ~6.6 MB with them)


def test_teacher_training_smoke(tmp_path):
    """A few steps of each teacher's training run write a folder diffusers loads."""
    for name in ("digits-ddpm", "fmnist-ldm"):  # fmnist-flow: tests/test_fmnist_flow.py
        vae_steps = 3 if name == "fmnist-ldm" else None  # digits-ddpm has no VAE: --vae-steps is an error there
        out = train_teacher(name, out=tmp_path / name, steps=3, vae_steps=vae_steps, batch_size=8, max_train_images=64)
        pipe = DiffusionPipeline.from_pretrained(out)
        assert (out / "training_log.json").is_file()
        if name == "fmnist-ldm":
            ids = pipe.tokenizer(zoo.prompts()).input_ids
            assert all(len(i) <= pipe.tokenizer.model_max_length for i in ids)


def test_cli_help_and_errors(capsys):
    for argv in (["--help"], ["zoo", "--help"], ["zoo", "train", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--num-images" in capsys.readouterr().out
    assert main(["zoo", "path", "nope"]) == 2
    assert "Unknown zoo teacher" in capsys.readouterr().err
    assert main(["zoo", "list"]) == 0
    assert "fmnist-ldm" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "fastgen.cli", "zoo", "path", "digits-ddpm"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("digits-ddpm")
