"""Model cards and sample grids of the zoo teachers (``fastgen zoo card NAME``).

Reads ``training_log.json`` written by :mod:`fastgen.train.teachers`, samples the teacher with
fastgen's DDIM sampler at 1, 2, 4 and 50 steps from the same noise, and writes README.md with
the data provenance, the exact command, seed, steps and wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastgen import zoo
from fastgen.pipelines.generate import PipelineSampler
from fastgen.pipelines.images import save_grid, save_panels
from fastgen.pipelines.prompts import call_text
from fastgen.pipelines.sampler import student_timesteps

GRID_STEPS = (1, 2, 4, 50)
# fastgen's "ddim" sampler is DDIM on a VP teacher and Euler on a flow teacher (x0 and noise moved to the next sigma)
SOLVER_NAME = {"digits-ddpm": "DDIM", "fmnist-ldm": "DDIM", "fmnist-flow": "Euler"}


def sample_grid_panels(pipe, steps=GRID_STEPS, per_class: int = 4, seed: int = 0, guidance_scale=None,
                       batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Teacher samples at each DDIM step count from the same seed: ``{"N steps": images}``.

    Text-conditional teachers get ``per_class`` images of each zoo class, class-major (one grid row
    per class); unconditional teachers get ``per_class ** 2`` images.
    """
    sampler = PipelineSampler(pipe)
    text = sampler.denoiser.is_conditional
    prompts = [p for p in zoo.prompts() for _ in range(per_class)] if text else None
    panels = {}
    for n in steps:
        timesteps = student_timesteps(sampler.denoiser.schedule, n, "ddim")
        generator = torch.Generator().manual_seed(seed)
        if text:
            images = torch.cat([sampler(prompts[i:i + batch_size], timesteps=timesteps, sampler="ddim",
                                        guidance_scale=guidance_scale, generator=generator)
                                for i in range(0, len(prompts), batch_size)])
        else:
            images = sampler(batch_size=per_class**2, timesteps=timesteps, sampler="ddim", generator=generator)
        panels[f"{n} step{'s' if n > 1 else ''}"] = images
    return panels


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def write_card(name: str, folder: str | Path) -> Path:
    """Write ``folder``'s README.md and sample grids from its ``training_log.json`` (``fastgen zoo card``)."""
    from fastgen.pipelines.loading import load_pipeline

    if name not in zoo.TEACHERS:
        raise KeyError(f"Unknown zoo teacher {name!r}; available: {', '.join(zoo.TEACHERS)}.")
    folder = Path(folder)
    log_file = folder / "training_log.json"
    if not log_file.is_file():
        raise FileNotFoundError(f"{folder} has no training_log.json: a model card is written from the log of "
                                f"`fastgen zoo train {name} --out {folder}`.")
    try:
        log = json.loads(log_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{log_file} is not a training log (invalid JSON: {err}).") from None
    pipe = load_pipeline(str(folder), what="Teacher")
    guidance = zoo.RECOMMENDED_GUIDANCE.get(name)
    if name in zoo.FMNIST_TEACHERS:
        solver = SOLVER_NAME[name]
        panels = sample_grid_panels(pipe, per_class=4, guidance_scale=guidance)
        save_panels(panels, folder / "samples.png", nrow=4, row_labels=zoo.FMNIST_CLASSES,
                    title=f"{name}, {solver}, guidance {guidance}")
        guid_panels = {}
        for w in (1.0, 1.5, 2.0, 3.0, 5.0):
            guid_panels[f"w={w}"] = sample_grid_panels(pipe, steps=(50,), per_class=4, guidance_scale=w)["50 steps"]
        save_panels(guid_panels, folder / "guidance.png", nrow=4, row_labels=zoo.FMNIST_CLASSES,
                    title=f"{name}, 50 {solver} steps, by guidance scale")
    if name == "fmnist-ldm":
        from fastgen.zoo.data import load_fashion_mnist

        real = load_fashion_mnist("test")[0][:16]
        with torch.no_grad():
            recon = pipe.vae.decode(pipe.vae.encode(real).latent_dist.mode()).sample
        save_grid(torch.cat([real, recon]).add(1).div(2).clamp(0, 1), folder / "vae_reconstructions.png", nrow=16)
    elif name == "digits-ddpm":
        panels = sample_grid_panels(pipe, per_class=8)
        save_panels(panels, folder / "samples.png", nrow=8, title="digits-ddpm, DDIM")
    card = _card_text(name, log, guidance)
    (folder / "README.md").write_text(card)
    return folder


FMNIST_DATA = ("Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence), from Debian's `dataset-fashion-mnist` "
               "package (`/usr/share/datasets/fashion-mnist`): the 60,000 training images, 28x28 padded with "
               "background to 32x32, scaled to [-1, 1].")


def _flow_card_parts(log: dict, guidance) -> tuple[str, str, str]:
    """``(data, parts table, usage)`` of fmnist-flow's card."""
    cfg = log["config"]
    options = log["prompt_options"]
    parts = f"""| part | class | parameters | training |
|---|---|---|---|
| VAE | fmnist-ldm's `AutoencoderKL` 1x32x32 -> 4x8x8 (`shift_factor` 0 added for SD3's decode) | {log['vae_params']:,} | none: frozen, reused |
| text encoders | fmnist-ldm's tiny `CLIPTextModel` as `CLIPTextModelWithProjection` (identity projection), used as both `text_encoder` and `text_encoder_2`; byte-level `CLIPTokenizer`; no T5 | {log['text_encoder_params']:,} (each) | none: frozen, reused |
| transformer | `SD3Transformer2DModel`, 4 joint blocks, width 64, patch 1 on 4x8x8 latents | {log['transformer_params']:,} | {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (cosine, {cfg['warmup']} warm-up), EMA {cfg['ema_decay']}, {int(cfg['cfg_dropout'] * 100)}% empty prompts, {_fmt_s(log['transformer_wall_s'])} |

- The same latents as fmnist-ldm: its VAE's posterior samples times its scaling factor {log['scaling_factor']:.4f}.
- Prompts: `"a photo of a {{class}}"`, as fmnist-ldm. SD3 needs two CLIP encoders and T5: the one tiny CLIP serves
  twice (joint width 64 + 64 = 128, pooled 128), and the folder has no T5 (`text_encoder_3 = None`, so diffusers
  loads it only when told so). Without T5, SD3's call appends `max_sequence_length` (default 256) all-zero tokens
  to the 32 CLIP tokens: ten times the compute of the 64 image tokens here. It was trained without them, so its
  call passes `{", ".join(f"{k}={v}" for k, v in options.items())}` (recorded in `model_index.json` under
  `_fastgen_prompt_options`, which fastgen reads and diffusers ignores).
- Guidance scale: **{guidance}** (fmnist-ldm's; `guidance.png` shows samples at w = 1 to 5).
"""
    usage = f"""pipe = DiffusionPipeline.from_pretrained(fastgen.zoo.path("fmnist-flow"),  # or the folder path
                                         text_encoder_3=None, tokenizer_3=None)  # no T5
image = pipe("a photo of a sneaker", num_inference_steps=50, guidance_scale={guidance}{call_text(options)},
             generator=torch.Generator().manual_seed(0)).images[0]"""
    return FMNIST_DATA, parts, usage


def _card_text(name: str, log: dict, guidance) -> str:
    cfg = log["config"]
    if name == "fmnist-ldm":
        data = FMNIST_DATA
        parts = f"""| part | class | parameters | training |
|---|---|---|---|
| VAE | `AutoencoderKL` 1x32x32 -> 4x8x8 | {log['vae_params']:,} | {cfg['vae_steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['vae_lr']}, MSE + {cfg['vae_kl_weight']} KL, {_fmt_s(log['vae_wall_s'])} |
| text encoder | tiny `CLIPTextModel` (2 layers, width 64) + byte-level `CLIPTokenizer` | {log['text_encoder_params']:,} | jointly with the UNet |
| UNet | `UNet2DConditionModel` on 4x8x8 latents | {log['unet_params']:,} | {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (cosine, {cfg['warmup']} warm-up), EMA {cfg['ema_decay']}, {int(cfg['cfg_dropout'] * 100)}% empty prompts, {_fmt_s(log['unet_wall_s'])} |

- Latent scaling factor (measured, 1 / std of training latents): {log['scaling_factor']:.4f}
- VAE test MSE (first 2,000 test images, [-1, 1] scale): **{log['vae_test_mse']:.5f}** -- `vae_reconstructions.png`
  (top: real test images, bottom: reconstructions).
- Prompts: `"a photo of a {{class}}"` for {", ".join(zoo.FMNIST_CLASSES)}; the tokenizer is byte-level
  (`vocab.json`: 256 byte characters, their `</w>` forms, 2 special tokens; `merges.txt`: version line only),
  `model_max_length` 32 holds the longest prompt.
- Recommended guidance scale: **{guidance}**: at 50 DDIM steps over w = 1, 1.5, 2, 2.5, 3, 4, the lowest per-class FD
  among the scales with prompt accuracy >= 90% ([guidance_sweep.md](guidance_sweep.md), with the command and every
  metric); `guidance.png` shows samples at w = 1 to 5.
"""
        usage = f"""pipe = DiffusionPipeline.from_pretrained(fastgen.zoo.path("fmnist-ldm"))  # or the folder path
image = pipe("a photo of a sneaker", num_inference_steps=50, guidance_scale={guidance},
             generator=torch.Generator().manual_seed(0)).images[0]"""
    elif name == "fmnist-flow":
        data, parts, usage = _flow_card_parts(log, guidance)
    else:
        data = ("scikit-learn's 8x8 handwritten digits (`sklearn.datasets.load_digits`, UCI ML digits): 1,497 "
                "training images (300 held out with seed 0 for evaluation), values 0..16 scaled to [-1, 1].")
        parts = f"""| part | class | parameters | training |
|---|---|---|---|
| UNet | `UNet2DModel` on 1x8x8 pixels | {log['unet_params']:,} | {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (cosine, {cfg['warmup']} warm-up), EMA {cfg['ema_decay']}, {_fmt_s(log['unet_wall_s'])} |
"""
        usage = """pipe = DiffusionPipeline.from_pretrained(fastgen.zoo.path("digits-ddpm"))
images = pipe(batch_size=16, num_inference_steps=1000, generator=torch.Generator().manual_seed(0)).images"""
    loss = log.get("unet_loss") or log["transformer_loss"]
    schedule = ("Rectified flow (`FlowMatchEulerDiscreteScheduler`, shift 1, `scheduler/scheduler_config.json`): "
                "x_t = (1 - sigma) x0 + sigma noise, the network predicts noise - x0 at t = 1000 sigma; training "
                "sigmas from SD3's logit-normal density (mean 0, std 1)." if name == "fmnist-flow" else
                "Noise schedule: DDPM, 1000 steps, epsilon prediction (`scheduler/scheduler_config.json`).")
    sampler = ("fastgen's Euler sampler on the scheduler's sigmas" if name == "fmnist-flow" else
               "fastgen's DDIM sampler (trailing timesteps")
    return f"""---
library_name: diffusers
license: apache-2.0
tags:
- fastgen
- tiny
---

# {name}

{zoo.TEACHERS[name]} A tiny *real* teacher of [fastgen](../../../README.md): trained on real data
on a CPU, small enough that a distillation run takes minutes.

## Data
{data}

## Model and training
{parts}
- {schedule}
- Denoising loss: {loss[0][1]:.4f} at the start, {loss[-1][1]:.4f} at the end (mean of the last 500 steps).
- Seed {cfg['seed']}; wall time measured on {log['machine']}.
- Reproduce: `{log['command']}` (then `fastgen zoo card {name}` rewrites this card and the grids).

## Samples
`samples.png`: {sampler}, the same noise in every panel{")" if name != "fmnist-flow" else ""} at 1, 2, 4
and 50 steps. At 1-2 steps the teacher gives blurry averages; that gap is what distillation closes.

![samples](samples.png)

## Use
```python
import torch, fastgen.zoo
from diffusers import DiffusionPipeline

{usage}
```
"""
