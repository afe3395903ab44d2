"""fastgen's own generation over a loaded diffusers pipeline: prompts -> noise -> sampler -> images.

:class:`PipelineSampler` mirrors what the diffusers pipeline does around its denoising loop
(prompt encoding, latent shape, initial noise, VAE decoding, ``[0, 1]`` output) and runs one of
fastgen's samplers in between. It is what training, evaluation and the export tests use; an
exported folder loaded with plain diffusers must give the same images for the same seed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastgen.denoiser import Conditioning, Denoiser, check_guidance_scale, latent_shape
from fastgen.guidance_embedding import embedding_dim, with_guidance
from fastgen.schedule import schedule_from_scheduler_config, schedule_timesteps

from .prompts import prompt_options
from .sampler import SAMPLERS


def is_flux(network: torch.nn.Module) -> bool:
    return type(network).__name__ == "FluxTransformer2DModel"


def network_component(pipe) -> str:
    """The component of ``pipe`` that is distilled and that a student replaces: ``unet`` or ``transformer``."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def denoiser_from_pipeline(pipe, model: torch.nn.Module | None = None) -> Denoiser:
    """A :class:`Denoiser` for the pipeline's network (or ``model``) with the pipeline's schedule, at the latent
    size the pipeline generates by default (its ``default_sample_size`` where it has one: SD3, SDXL, Flux; else the
    network's ``sample_size``). A flow schedule with dynamic shifting gets its ``mu`` from that size's image
    sequence length, as the SD3 and Flux pipelines compute it (patches of ``patch_size``; Flux: packed 2x2)."""
    network = model if model is not None else getattr(pipe, network_component(pipe), None)
    if network is None:
        raise TypeError(f"{type(pipe).__name__} has no `unet` or `transformer` component.")
    return network_denoiser(network, pipe.scheduler.config, getattr(pipe, "default_sample_size", None))


def network_denoiser(network: torch.nn.Module, scheduler_config, sample_size: int | None = None) -> Denoiser:
    """A :class:`Denoiser` for ``network`` with the schedule of ``scheduler_config`` at latent size ``sample_size``
    (default: the network's): :func:`denoiser_from_pipeline` for a network outside a pipeline (a hybrid run's
    teacher)."""
    _, height, width = latent_shape(network, sample_size)
    patch = 2 if is_flux(network) else (getattr(network.config, "patch_size", None) or 1)
    schedule = schedule_from_scheduler_config(scheduler_config, image_seq_len=(height // patch) * (width // patch))
    return Denoiser(network, schedule, sample_size)


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` of a network's first parameter. diffusers' ``model.device`` / ``pipe.device`` walk every
    submodule looking for offloading hooks, milliseconds per call of Python for a small network's call."""
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def sdxl_time_ids(pipe, batch_size: int, pooled: torch.Tensor) -> torch.Tensor:
    """SDXL's size conditioning ``[B, 6]`` as its plain call makes it: original size = target size = the default
    image size (``default_sample_size * vae_scale_factor``), crop top-left ``(0, 0)`` (the negative prompt's too)."""
    size = pipe.default_sample_size * pipe.vae_scale_factor
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    projection = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=pooled.dtype,
                                 text_encoder_projection_dim=projection)
    return ids.to(pooled.device).repeat(batch_size, 1)


def encode_prompts(pipe, prompts: Sequence[str], negative_prompt: str = "", guidance: bool = True,
                   device: torch.device | None = None) -> tuple[Conditioning, Conditioning | None]:
    """Conditioning of ``prompts`` and of the negative prompt, with the pipeline's own ``encode_prompt``
    (without ``guidance`` the negative prompt is not encoded and ``None`` is returned for it), on ``device``
    (default: the pipeline's).

    ``encode_prompt`` is called by keyword: its positional order differs between pipelines (SDXL's second
    argument is ``prompt_2``). The empty negative prompt is passed as ``None``, as the plain call passes it, so
    that SDXL's ``force_zeros_for_empty_prompt`` gives zero embeddings here as there. SD3 returns pooled
    embeddings for the transformer's ``pooled_projections``; SDXL for the UNet's ``text_embeds``, with the size
    ids of :func:`sdxl_time_ids`."""
    import inspect

    if not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"{type(pipe).__name__} is not text-conditional; pass batch_size instead of prompts.")
    device = device if device is not None else pipe.device
    if is_flux(getattr(pipe, "transformer", None)):  # Flux: (embeds, pooled, text_ids); no negative prompt in its call
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                               num_images_per_prompt=1)
        if not guidance:
            return Conditioning(embeds, pooled), None
        neg, neg_pooled, _ = pipe.encode_prompt(prompt=[negative_prompt] * len(prompts), prompt_2=None, device=device,
                                                num_images_per_prompt=1)
        return Conditioning(embeds, pooled), Conditioning(neg, neg_pooled)
    accepted = inspect.signature(pipe.encode_prompt).parameters
    kwargs = dict(prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
                  negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None)
    kwargs.update({name: None for name in ("prompt_2", "prompt_3") if name in accepted})  # SD3 requires them
    kwargs.update(prompt_options(pipe))  # e.g. fmnist-flow's max_sequence_length=0 (no T5)
    out = pipe.encode_prompt(**kwargs)
    if len(out) == 2:  # Stable Diffusion 1.x / 2.x: (embeds, negative embeds)
        embeds, neg = out
        return Conditioning(embeds), Conditioning(neg) if guidance else None
    embeds, neg, pooled, neg_pooled = out
    if hasattr(pipe, "_get_add_time_ids"):  # SDXL: pooled text and size ids are the UNet's added conditioning
        time_ids = sdxl_time_ids(pipe, len(prompts), pooled)
        return (Conditioning(embeds, text_embeds=pooled, time_ids=time_ids),
                Conditioning(neg, text_embeds=neg_pooled, time_ids=time_ids) if guidance else None)
    return Conditioning(embeds, pooled), Conditioning(neg, neg_pooled) if guidance else None


class PipelineSampler:
    """Sample a diffusers pipeline's network with one of fastgen's samplers.

    Args:
        pipe: a loaded ``DDPMPipeline``, ``StableDiffusionPipeline``, SD3 or Flux pipeline -- teacher or student.
        model: optional replacement network (e.g. a student being trained); defaults to the pipeline's.
    """

    def __init__(self, pipe, model: torch.nn.Module | None = None):
        self.pipe = pipe
        self.denoiser = denoiser_from_pipeline(pipe, model)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.denoiser.latent_shape

    def conditioning(self, prompts: Sequence[str] | None, guidance_scale: float | None, negative_prompt: str = "",
                     need_uncond: bool = False, device: torch.device | None = None):
        """``(cond, uncond, w)`` with diffusers' convention: guidance only when ``w > 1``. The negative prompt is
        encoded only when guidance (or ``need_uncond``) needs it; ``uncond`` is ``None`` otherwise. ``device``:
        where the embeddings go (default: the pipeline's)."""
        if prompts is None:
            if self.denoiser.is_conditional:
                raise ValueError("This pipeline is text-conditional: pass prompts.")
            return None, None, None
        if self.denoiser.embeds_guidance:  # guidance-distilled Flux: the scale is the network's input, no CFG
            cond, uncond = encode_prompts(self.pipe, prompts, negative_prompt, guidance=need_uncond, device=device)
            return cond, uncond, guidance_scale
        w = guidance_scale if guidance_scale is not None and guidance_scale > 1 else None
        dim = embedding_dim(self.denoiser.model)
        if dim is not None:  # guidance distilled into a w-embedding: the pipeline embeds W - 1 and runs no CFG
            w = None
        cond, uncond = encode_prompts(self.pipe, prompts, negative_prompt, guidance=w is not None or need_uncond,
                                      device=device)
        if dim is not None:
            cond = with_guidance(cond, 1.0 if guidance_scale is None else guidance_scale, dim)
        return cond, uncond, w

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels) to images in [0, 1], as the pipeline's post-processing does: an fp16 VAE whose config
        says ``force_upcast`` (SDXL's, which overflows in fp16) decodes in fp32, as ``StableDiffusionXLPipeline``
        decodes (it casts the VAE to fp32 for the decode and back to fp16 after it)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            dtype = placement(vae)[1]
            upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            if upcast:  # the latents too, before they are unscaled (in fp32, as there)
                dtype, latents = torch.float32, latents.float()
                vae.to(torch.float32)
            latents = latents / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None):
                latents = latents + vae.config.shift_factor
            try:
                latents = vae.decode(latents.to(dtype)).sample
            finally:
                if upcast:
                    vae.to(torch.float16)
        return (latents / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | None = None, batch_size: int | None = None,
                 timesteps: Sequence[int] = (999,), sampler: str = "multistep", guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output: str = "images", progress: bool = False):
        """Generate images ``[B, C, H, W]`` in [0, 1] (or raw latents with ``output="latents"``).

        Args:
            prompts: one prompt per image (text-conditional pipelines).
            batch_size: number of images (unconditional pipelines).
            timesteps: descending network timesteps of the sampler.
            sampler: ``"multistep"`` (x0-then-renoise) or ``"ddim"``.
            guidance_scale: classifier-free guidance; ``None`` or ``<= 1`` disables it, as in diffusers.
            generator: torch generator; the same seed gives the same images as the exported pipeline.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}.")
        timesteps = schedule_timesteps(self.denoiser.schedule, timesteps)
        check_guidance_scale(guidance_scale)
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts:
                raise ValueError("prompts is empty: pass at least one prompt.")
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (or pass prompts), got {batch_size!r}.")
        cond, uncond, w = self.conditioning(prompts, guidance_scale)
        n = len(prompts) if prompts is not None else batch_size
        model = self.denoiser.model
        device, dtype = placement(model)
        noise = randn_tensor((n, *self.latent_shape), generator=generator, device=device, dtype=dtype)
        latents = SAMPLERS[sampler](self.denoiser, noise, timesteps, cond, uncond, w, generator, progress)
        return latents if output == "latents" else self.decode(latents)
