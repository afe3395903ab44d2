import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_unet(prediction_channels: int = 1, size: int = 8):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=prediction_channels, out_channels=prediction_channels,
                       layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def tiny_cond_unet(time_cond_proj_dim=None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=4,
                                norm_num_groups=8, time_cond_proj_dim=time_cond_proj_dim,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)


def tiny_recipe(path, ratio: int | None = 2, ema_decay: float = 0.0, steps: int = 6, batch_size: int = 4,
                checkpoint_every: int = 3, log_every: int = 2, critic_warmup: int = 2):
    """Write a DMD2 recipe for the tiny teachers (tests, tests/kill9_campaign.py) and return its path as a str.
    ``ratio=None`` leaves out the [dmd2] section, so that ``--set method=...`` can switch the method."""
    from pathlib import Path

    method = f"[dmd2]\nratio = {ratio}\n" if ratio is not None else ""
    Path(path).write_text(f"""method = "dmd2"
{method}[student]
ema_decay = {ema_decay}
[optim.generator]
lr = 1e-3
warmup_steps = 0
[optim.critic]
lr = 1e-3
warmup_steps = {critic_warmup}
[train]
steps = {steps}
batch_size = {batch_size}
checkpoint_every = {checkpoint_every}
log_every = {log_every}
progress = false
""")
    return str(path)


class Killed(Exception):
    """Stands in for a kill: raised inside the training loop, after the checkpoint of the step before."""


def assert_resumes_exactly(method_class, recipe, teacher, root, stops, overrides=()):
    """Train ``recipe`` whole, then once per step in ``stops`` killed at that step and resumed through the runner;
    every resumed run must end with exactly the whole run's state (all checkpointed tensors) and exported weights.
    Returns the whole run's folder."""
    import pytest
    from safetensors.torch import load_file

    from fastgen.train.runner import run_training
    from fastgen.train.trainer import latest_checkpoint

    whole = run_training(str(recipe), list(overrides), teacher=str(teacher), out=str(root / "whole")).parent
    step_of = method_class.training_step
    for stop in stops:
        folder = root / f"stop{stop}"

        def dies(self, batch, step, stop=stop):
            if step == stop:
                raise Killed
            return step_of(self, batch, step)

        method_class.training_step = dies
        try:
            with pytest.raises(Killed):
                run_training(str(recipe), list(overrides), teacher=str(teacher), out=str(folder))
        finally:
            method_class.training_step = step_of
        run_training(str(recipe), list(overrides), teacher=str(teacher), out=str(folder), resume=True)
        a = load_file(str(latest_checkpoint(whole / "checkpoints") / "model.safetensors"))
        b = load_file(str(latest_checkpoint(folder / "checkpoints") / "model.safetensors"))
        assert a.keys() == b.keys() and not any(k.startswith("teacher.") for k in a)
        for key in a:
            assert torch.equal(a[key], b[key]), (stop, key)
        network = "unet" if (whole / "student" / "unet").is_dir() else "transformer"
        wa = load_file(str(next((whole / "student" / network).glob("*.safetensors"))))
        wb = load_file(str(next((folder / "student" / network).glob("*.safetensors"))))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    return whole


def fixed_batch_losses(method, text_pipe=None, lr: float = 2e-4, steps: int = 25, same_draws: bool = False):
    """``(before, after)``: ``method``'s loss on one batch of 8 samples (and the zoo's prompts with ``text_pipe``) at
    fixed draws of t, noise and w, before and after ``steps`` Adam steps on that batch (each with fresh draws, or
    with those same draws when ``same_draws``); the method's ``end_step`` runs after each."""
    from fastgen import zoo
    from fastgen.methods import Batch
    from fastgen.pipelines.generate import encode_prompts

    torch.manual_seed(1)
    batch = Batch(8, real=torch.randn(8, *method.latent_shape).clamp(-1, 1))
    if text_pipe is not None:
        with torch.no_grad():
            batch.real_cond, batch.uncond = encode_prompts(text_pipe, zoo.prompts()[:8])
    opt = torch.optim.Adam(method.parameter_groups()["generator"], lr=lr)

    def fixed_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return float(method.training_step(batch, 0).losses["generator"])

    before = fixed_loss()
    for step in range(steps):
        if same_draws:
            torch.manual_seed(123)
        loss = method.training_step(batch, step).losses["generator"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.end_step(step)
    return before, fixed_loss()


def perturbed(network):
    """A student network: the teacher's, perturbed (a real model that is not the teacher)."""
    student = type(network).from_config(network.config)
    student.load_state_dict(network.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return student


def save_tiny_ddpm(folder, seed: int = 0):
    """Write a tiny ``DDPMPipeline`` teacher (safetensors) to ``folder`` and return the folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def tiny_sd3_pipeline(folder):
    """A tiny StableDiffusion3Pipeline built from diffusers' and transformers' classes: the conftest transformer,
    two CLIP text encoders with projections (8 + 8 = its pooled and joint widths), a T5 encoder, the zoo's
    byte-level tokenizer (written to ``folder``) for all three, and a VAE with a shift factor (16x16 images)."""
    from pathlib import Path

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from fastgen.train.teachers import build_byte_tokenizer

    tok = build_byte_tokenizer(Path(folder) / "tokenizer")

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=8, intermediate_size=16, projection_dim=8, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
                        block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.1, scaling_factor=1.5)
    pipe = StableDiffusion3Pipeline(transformer=tiny_sd3_transformer(), vae=vae, text_encoder=clip(), tokenizer=tok,
                                    text_encoder_2=clip(), tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=tok,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    for module in pipe.components.values():  # eval mode, as from_pretrained loads them (T5's dropout is 0.1)
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def tiny_flux_pipeline(folder, guidance_embeds: bool = True, dynamic_shift: bool = True):
    """A tiny FluxPipeline built from diffusers' and transformers' classes: a one double- and one single-stream block
    FluxTransformer2DModel (4 latent channels packed into 16; with or without the guidance embedding of guidance-
    distilled teachers), a CLIP text encoder (pooled width 8) and a T5 encoder (width 16) sharing the zoo's byte-level
    tokenizer (written to ``folder``), a VAE with a shift factor (scale factor 2), and FLUX.1-dev's scheduler config
    (dynamic shifting) or a static shift of 3."""
    from pathlib import Path

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fastgen.train.teachers import build_byte_tokenizer

    tok = build_byte_tokenizer(Path(folder) / "tokenizer")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
                        block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.1, scaling_factor=1.5)
    if dynamic_shift:  # FLUX.1-dev's scheduler
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=transformer)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def flow_student(root, family: str, guidance_scale: float):
    """``(teacher pipeline, student network, student folder)``: a tiny SD3 or Flux teacher (guidance embedding,
    dynamic shift) in ``root`` and a 2-step multistep student of it (its network perturbed: a real model that is
    not the teacher) exported to ``root / "student"`` at the teacher's continuous 2-step timesteps, the Flux one
    trained at 16x16 pixels (latent size 8, not FluxPipeline's default 128: ``data.resolution = 16``)."""
    from fastgen.pipelines.export import export_student
    from fastgen.pipelines.generate import PipelineSampler
    from fastgen.pipelines.sampler import student_timesteps

    torch.manual_seed(0)
    pipe = tiny_sd3_pipeline(root) if family == "sd3" else tiny_flux_pipeline(root)
    if family == "flux":
        pipe.default_sample_size = 8
    network = perturbed(pipe.transformer)
    timesteps = student_timesteps(PipelineSampler(pipe).denoiser.schedule, 2)
    folder = export_student(pipe, root / "student", model=network, timesteps=timesteps, method="dmd2",
                            guidance_scale=guidance_scale)
    return pipe, network, folder


def tiny_vae(**kwargs):
    """A tiny RGB ``AutoencoderKL``: 16x16 images <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
                         block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, **kwargs)


def tiny_clip(tokenizer, projection: bool = False, hidden_size: int = 8):
    """A tiny CLIP text encoder over ``tokenizer`` (``CLIPTextModelWithProjection`` with ``projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            projection_dim=8, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _eval(pipe):
    for module in pipe.components.values():  # eval mode, as from_pretrained loads them
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def tiny_sd_pipeline(folder, prediction_type: str = "epsilon", seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (SD1.5-style with ``"epsilon"``; SD2-style with ``"v_prediction"``:
    trailing timestep spacing and zero terminal SNR, as SD2.x-v fine-tunes use), built from diffusers' classes
    with the zoo's byte-level tokenizer (written to ``folder/tokenizer``)."""
    from pathlib import Path

    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from fastgen.train.teachers import build_byte_tokenizer

    torch.manual_seed(seed)
    tok = build_byte_tokenizer(Path(folder) / "tokenizer")
    if prediction_type == "epsilon":
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    else:
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type=prediction_type, timestep_spacing="trailing",
                                           steps_offset=1)
    return _eval(StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(tok, hidden_size=16), tokenizer=tok, unet=tiny_cond_unet(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False))


def tiny_sdxl_unet():
    """A tiny SDXL ``UNet2DConditionModel``: text-time added conditioning (pooled text of the second encoder,
    projection 8, and six size ids embedded with width 8), cross-attention over both encoders (8 + 8)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=4,
                                norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_sdxl_pipeline(folder, seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` built from diffusers' and transformers' classes: a ``CLIPTextModel`` and
    a ``CLIPTextModelWithProjection`` (its pooled output and the size ids are the UNet's added conditioning), the
    zoo's byte-level tokenizer for both, a tiny VAE and SDXL's ``EulerDiscreteScheduler`` settings."""
    from pathlib import Path

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from fastgen.train.teachers import build_byte_tokenizer

    torch.manual_seed(seed)
    tok = build_byte_tokenizer(Path(folder) / "tokenizer")
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    return _eval(StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(tok), text_encoder_2=tiny_clip(tok, projection=True), tokenizer=tok,
        tokenizer_2=tok, unet=tiny_sdxl_unet(), scheduler=scheduler, force_zeros_for_empty_prompt=True))


def snapshot(*paths) -> dict:
    """Every file and folder under ``paths`` with size and modification time (``None``: the path does not exist)."""
    from pathlib import Path

    state = {}
    for root in map(Path, paths):
        if not root.exists():
            state[str(root)] = None
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            if "__pycache__" in p.parts:
                continue
            st = p.stat()
            state[str(p)] = ("dir", 0, 0) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return state
