"""Builders and training of the zoo's tiny teachers (``fastgen zoo train NAME``).

Each teacher is trained from a fixed seed with a fixed number of steps, so the command in
its model card reproduces the shipped weights on the same machine. Training writes the
diffusers folder plus ``training_log.json`` (seed, steps, losses, wall time), from which
:mod:`fastgen.train.cards` writes the model card and sample grids.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastgen import zoo
from fastgen.pipelines.folders import installed_output, keep_other_files, writing_folder
from fastgen.pipelines.portable import write_legacy_text_encoder
from fastgen.zoo.data import load_digits, load_fashion_mnist


@dataclass
class TeacherConfig:
    """Hyper-parameters of one teacher's training run (all recorded in the model card)."""

    seed: int = 0
    steps: int = 6000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    vae_steps: int = 0
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    cfg_dropout: float = 0.1
    max_train_images: int = 0  # 0: the whole training split (a smaller number is for smoke tests)


DEFAULTS = {
    "digits-ddpm": TeacherConfig(steps=6000, batch_size=64),
    "fmnist-ldm": TeacherConfig(steps=10000, batch_size=64, vae_steps=2500),
    "fmnist-flow": TeacherConfig(steps=10000, batch_size=64, lr=3e-4),
}

# fmnist-flow: the static shift of its FlowMatchEulerDiscreteScheduler (SD3's 3.0 is for 128x128 latents; 8x8
# latents train and sample unshifted), and its prompt arguments: no T5 tokens (see build_fmnist_flow_pipeline).
FLOW_SHIFT = 1.0
FLOW_PROMPT_OPTIONS = {"max_sequence_length": 0}


# --- architectures ------------------------------------------------------------------------
def build_digits_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def build_fmnist_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, sample_size=32, layers_per_block=1,
                         block_out_channels=(32, 48, 64), norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def build_fmnist_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 48, 64), cross_attention_dim=64, attention_head_dim=8,
                                norm_num_groups=16,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def build_fmnist_transformer():
    """fmnist-flow's network: 4 joint blocks of width 64 on 4x8x8 latents, patch 1 (64 image tokens)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=128,
                                 caption_projection_dim=64, pooled_projection_dim=128, pos_embed_max_size=8)


def projected_text_encoder(text_encoder):
    """fmnist-ldm's ``CLIPTextModel`` as the ``CLIPTextModelWithProjection`` SD3 takes: the same weights and an
    identity ``text_projection``, so its pooled output is the encoder's own pooled output."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    width = text_encoder.config.hidden_size
    model = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_encoder.config.to_dict(), "projection_dim": width}))
    # every weight, strictly (transformers 5 keeps them on CLIPTextModel itself, 4.x on its text_model)
    model.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(width))
    return model.eval().requires_grad_(False)


def build_fmnist_flow_pipeline(transformer=None):
    """fmnist-flow as a ``StableDiffusion3Pipeline`` over fmnist-ldm's frozen VAE, text encoder and tokenizer.

    SD3 takes two CLIP encoders with projections and T5. The one tiny CLIP of fmnist-ldm serves as both CLIP
    encoders (:func:`projected_text_encoder`: joint width 64 + 64 = 128, pooled width 128); there is no T5. SD3's
    call would then append ``max_sequence_length`` (default 256) all-zero T5 tokens to the 32 CLIP tokens, ten times
    the compute of the 64 image tokens on this machine (1.05 against 0.11 s per batch-64 step, measured): fmnist-flow
    is trained and called with ``max_sequence_length=0`` (:data:`FLOW_PROMPT_OPTIONS`, recorded in its folder).
    The VAE gets ``shift_factor = 0`` (SD3's decode adds it; fmnist-ldm's has none): the same latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from fastgen.pipelines.loading import load_pipeline

    ldm = load_pipeline("fmnist-ldm", what="fmnist-ldm (the VAE and text encoder fmnist-flow reuses)")
    ldm.vae.register_to_config(shift_factor=0.0)
    encoder = projected_text_encoder(ldm.text_encoder)
    return StableDiffusion3Pipeline(transformer=transformer if transformer is not None else build_fmnist_transformer(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), vae=ldm.vae,
                                    text_encoder=encoder, tokenizer=ldm.tokenizer, text_encoder_2=encoder,
                                    tokenizer_2=ldm.tokenizer, text_encoder_3=None, tokenizer_3=None)


def build_byte_tokenizer(folder: Path, model_max_length: int = 32):
    """An offline byte-level ``CLIPTokenizer``: every byte is a token (no merges).

    ``vocab.json`` holds the 256 byte characters, their ``</w>`` (end-of-word) forms and the
    two special tokens; ``merges.txt`` holds only the version line. A prompt of ``n``
    non-space characters becomes ``n + 2`` tokens, so ``model_max_length`` must exceed the
    longest prompt's length.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    longest = max(len(p.replace(" ", "")) + 2 for p in zoo.prompts())
    if model_max_length < longest:
        raise ValueError(f"model_max_length={model_max_length} would truncate prompts of {longest} tokens.")
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] +
                                                ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "pad_token": "<|endoftext|>",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return CLIPTokenizer.from_pretrained(folder)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def teacher_scheduler_config(name: str) -> dict:
    """The DDPM noise schedule each teacher is trained with."""
    if name == "digits-ddpm":
        return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                    prediction_type="epsilon", clip_sample=True)
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="epsilon", clip_sample=False)


# --- training helpers ---------------------------------------------------------------------
def _lr_lambda(cfg_warmup: int, total: int):
    def fn(step):
        if step < cfg_warmup:
            return (step + 1) / cfg_warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg_warmup) / max(1, total - cfg_warmup)))
    return fn


def _machine() -> str:
    import os
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def _diffusion_loop(model, params, batches, noising, predict, cfg: TeacherConfig, desc: str):
    """Denoising training with EMA, for any parameterisation: ``batches(step)`` yields ``(x0, cond or None)``,
    ``noising(x0)`` returns ``(x_t, t, target)`` and ``predict(x_t, t, cond)`` the network's output (MSE to target)."""
    from diffusers.training_utils import EMAModel

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    losses = []
    bar = tqdm(range(cfg.steps), desc=desc)
    for step in bar:
        x0, cond = batches(step)
        x_t, t, target = noising(x0)
        loss = F.mse_loss(predict(x_t, t, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(model.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
    ema.copy_to(model.parameters())
    return losses


def epsilon_noising(scheduler):
    """DDPM's ``noising`` for :func:`_diffusion_loop`: integer t ~ U{0..T-1}, the target is the noise."""
    def noising(x0):
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(scheduler.alphas_cumprod), (x0.shape[0],))
        return scheduler.add_noise(x0, noise, t), t, noise
    return noising


def flow_noising(num_train_timesteps: int = 1000):
    """Rectified flow's ``noising`` (SD3): sigma from the logit-normal density (diffusers'
    ``compute_density_for_timestep_sampling``, mean 0, std 1), ``x_t = (1 - sigma) x0 + sigma noise``, the
    continuous timestep ``t = sigma T`` and the target velocity ``noise - x0``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    def noising(x0):
        noise = torch.randn_like(x0)
        sigma = compute_density_for_timestep_sampling("logit_normal", x0.shape[0], logit_mean=0.0, logit_std=1.0)
        s = sigma.reshape(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, sigma * num_train_timesteps, noise - x0
    return noising


def _summary(losses: list[float], every: int = 500) -> list[list[float]]:
    return [[i, float(sum(losses[max(0, i - every):i + 1]) / len(losses[max(0, i - every):i + 1]))]
            for i in range(0, len(losses), every)] + [[len(losses) - 1, float(sum(losses[-every:]) / len(losses[-every:]))]]


# --- the two teachers ---------------------------------------------------------------------
def train_digits(out: Path, cfg: TeacherConfig) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(cfg.seed)
    images, _ = load_digits("train")
    if cfg.max_train_images:
        images = images[:cfg.max_train_images]
    unet = build_digits_unet()
    scheduler = DDPMScheduler(**teacher_scheduler_config("digits-ddpm"))
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches(step):
        return images[torch.randint(0, len(images), (cfg.batch_size,), generator=gen)], None

    start = time.time()
    losses = _diffusion_loop(unet, list(unet.parameters()), batches, epsilon_noising(scheduler),
                             lambda x_t, t, _: unet(x_t, t).sample, cfg, "digits-ddpm")
    wall = time.time() - start
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    return {"unet_params": sum(p.numel() for p in unet.parameters()), "unet_wall_s": wall,
            "unet_loss": _summary(losses), "train_images": len(images)}


def train_vae(cfg: TeacherConfig, images: torch.Tensor, test_images: torch.Tensor):
    """Train the 32x32 -> 8x8x4 AutoencoderKL with MSE + a small KL term."""
    vae = build_fmnist_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg.vae_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.vae_steps), desc="fmnist-ldm vae")
    losses = []
    for step in bar:
        x = images[torch.randint(0, len(images), (cfg.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(mse.item())
        if step % 50 == 0:
            bar.set_postfix(mse=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    vae.eval()
    with torch.no_grad():
        test_mse = sum(F.mse_loss(vae.decode(vae.encode(b).latent_dist.mode()).sample, b, reduction="sum").item()
                       for b in test_images.split(500)) / test_images.numel()
    # test_images: the first 2,000 images of the Fashion-MNIST test split (see train_fmnist)
    return vae, losses, test_mse


def encode_training_set(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means, stds)`` of the VAE's posterior on every image (the latent-diffusion teachers' training data)."""
    with torch.no_grad():
        dists = [vae.encode(b).latent_dist for b in images.split(1000)]
        return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def latent_batches(means, stds, labels, scaling_factor: float, cfg: TeacherConfig, gen: torch.Generator):
    """``batches(step) -> (latents, prompt index)`` of the Fashion-MNIST teachers: a posterior sample of
    ``batch_size`` random training images, scaled, and their class (10, the empty prompt, for ``cfg_dropout``)."""
    def batches(step):
        idx = torch.randint(0, len(means), (cfg.batch_size,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_dropout
        return z, torch.where(drop, torch.full_like(labels[idx], 10), labels[idx])
    return batches


def train_fmnist(out: Path, cfg: TeacherConfig) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    images, labels = load_fashion_mnist("train")
    if cfg.max_train_images:
        images, labels = images[:cfg.max_train_images], labels[:cfg.max_train_images]
    test_images = load_fashion_mnist("test")[0][:min(2000, cfg.max_train_images or 2000)]

    start = time.time()
    vae, vae_losses, vae_test_mse = train_vae(cfg, images, test_images)
    vae_wall = time.time() - start

    # Encode the training set once; the diffusion model trains on posterior samples.
    means, stds = encode_training_set(vae, images)
    with torch.no_grad():
        scaling_factor = float(1.0 / (means + stds * torch.randn_like(means)).std())
    vae.register_to_config(scaling_factor=scaling_factor)

    tokenizer = build_byte_tokenizer(out / "_tokenizer_build")
    text_encoder = build_text_encoder(tokenizer)
    unet = build_fmnist_unet()
    prompt_list = zoo.prompts() + [""]  # index 10 is the empty prompt (classifier-free guidance)
    ids = tokenizer(prompt_list, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    batches = latent_batches(means, stds, labels, scaling_factor, cfg, torch.Generator().manual_seed(cfg.seed + 2))

    def encode(prompt_idx):  # run the text encoder on the 11 distinct prompts only, then gather
        return text_encoder(ids)[0][prompt_idx]

    scheduler_cfg = teacher_scheduler_config("fmnist-ldm")
    from diffusers import DDPMScheduler
    train_scheduler = DDPMScheduler(**scheduler_cfg)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    start = time.time()
    losses = _diffusion_loop(unet, params, batches, epsilon_noising(train_scheduler),
                             lambda x_t, t, cond: unet(x_t, t, encoder_hidden_states=encode(cond)).sample, cfg,
                             "fmnist-ldm unet")
    unet_wall = time.time() - start

    scheduler = DDIMScheduler(**scheduler_cfg, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    write_legacy_text_encoder(text_encoder, out / "text_encoder")  # readable by transformers 4.x too
    import shutil
    for f in ("vocab.json", "merges.txt"):  # keep the human-readable byte vocabulary beside tokenizer.json
        shutil.copy(out / "_tokenizer_build" / f, out / "tokenizer" / f)
    shutil.rmtree(out / "_tokenizer_build")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet_params": n(unet), "vae_params": n(vae), "text_encoder_params": n(text_encoder),
            "vae_wall_s": vae_wall, "unet_wall_s": unet_wall, "vae_test_mse": vae_test_mse,
            "vae_mse": _summary(vae_losses), "unet_loss": _summary(losses), "scaling_factor": scaling_factor,
            "train_images": len(images)}


def train_fmnist_flow(out: Path, cfg: TeacherConfig) -> dict:
    """fmnist-flow: an SD3 transformer trained by rectified flow on fmnist-ldm's latents of Fashion-MNIST, with
    fmnist-ldm's VAE and text encoder frozen (:func:`build_fmnist_flow_pipeline`)."""
    from fastgen.pipelines.portable import make_portable
    from fastgen.pipelines.prompts import write_prompt_options

    torch.manual_seed(cfg.seed)
    images, labels = load_fashion_mnist("train")
    if cfg.max_train_images:
        images, labels = images[:cfg.max_train_images], labels[:cfg.max_train_images]
    pipe = build_fmnist_flow_pipeline()
    means, stds = encode_training_set(pipe.vae, images)
    scaling_factor = pipe.vae.config.scaling_factor
    with torch.no_grad():  # the frozen encoders, once, on the 10 class prompts and the empty one (index 10)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=zoo.prompts() + [""], prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, **FLOW_PROMPT_OPTIONS)
    batches = latent_batches(means, stds, labels, scaling_factor, cfg, torch.Generator().manual_seed(cfg.seed + 2))
    net = pipe.transformer

    def predict(x_t, t, prompt_idx):
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=embeds[prompt_idx],
                   pooled_projections=pooled[prompt_idx]).sample

    start = time.time()
    noising = flow_noising(pipe.scheduler.config.num_train_timesteps)
    losses = _diffusion_loop(net, list(net.parameters()), batches, noising, predict, cfg, "fmnist-flow transformer")
    wall = time.time() - start
    pipe.save_pretrained(out)
    make_portable(pipe, out)
    write_prompt_options(out, FLOW_PROMPT_OPTIONS)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"transformer_params": n(net), "vae_params": n(pipe.vae), "text_encoder_params": n(pipe.text_encoder),
            "transformer_wall_s": wall, "transformer_loss": _summary(losses), "scaling_factor": scaling_factor,
            "train_images": len(images), "shift": FLOW_SHIFT, "prompt_options": FLOW_PROMPT_OPTIONS}


TRAINERS = {"digits-ddpm": train_digits, "fmnist-ldm": train_fmnist, "fmnist-flow": train_fmnist_flow}


def check_teacher_config(name: str, cfg: TeacherConfig, overrides: dict) -> None:
    """One-line ``ValueError`` for settings that cannot train ``name`` (before anything is loaded or written)."""
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size,
                "vae_steps": cfg.vae_steps if name == "fmnist-ldm" else 1}
    bad = {k: v for k, v in positive.items() if v < 1}
    if bad:
        raise ValueError(", ".join(f"{_option(k)} must be >= 1, got {v}" for k, v in bad.items()) + ".")
    if name != "fmnist-ldm" and overrides.get("vae_steps") is not None:
        raise ValueError(f"--vae-train-steps applies to fmnist-ldm only; {name} has no VAE.")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {cfg.seed}.")


def _option(key: str) -> str:
    """The ``fastgen zoo train`` option of a :class:`TeacherConfig` field."""
    return {"steps": "--train-steps", "vae_steps": "--vae-train-steps"}.get(key, "--" + key.replace("_", "-"))


def train_teacher(name: str, out: str | Path | None = None, replace_installed: bool = False, **overrides) -> Path:
    """Train a zoo teacher from its fixed seed and write it to ``out`` (default ``./zoo/<name>``; with
    ``replace_installed``, into the installed zoo). The folder is written under a temporary name and renamed into
    place when training is done; files of a replaced folder that training does not write (model card, grids,
    notes) are kept."""
    if name not in zoo.TEACHERS:
        raise KeyError(f"Unknown zoo teacher {name!r}; available: {', '.join(zoo.TEACHERS)}.")
    cfg = TeacherConfig(**{**asdict(DEFAULTS[name]), **{k: v for k, v in overrides.items() if v is not None}})
    check_teacher_config(name, cfg, overrides)
    out = installed_output(out, zoo.path(name, check=False), replace_installed, zoo.USER_DIR / name)
    with writing_folder(out, marker="model_index.json", what="Teacher folder") as tmp:
        stats = TRAINERS[name](tmp, cfg)
        log = {"name": name, "config": asdict(cfg), "machine": _machine(), **stats,
               "command": f"fastgen zoo train {name} --out DIR" + "".join(
                   f" {_option(k)} {v}" for k, v in overrides.items() if v is not None)}
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
        keep_other_files(out, tmp)
    return out
