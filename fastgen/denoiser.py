"""A denoiser: any diffusers denoising network + its noise schedule + its conditioning.

``Denoiser(model, schedule)(x_t, t, cond)`` returns a :class:`Prediction` from which the
clean sample ``x0``, the noise ``eps``, ``v`` and the flow velocity are all available,
whatever the teacher's own parameterisation. Classifier-free guidance is applied here and
nowhere else. ``capture_features()`` exposes the bottleneck activations through a forward
hook (never a patched forward), for GAN heads.

Supported networks: ``UNet2DModel`` (unconditional), ``UNet2DConditionModel`` (text
conditioning, optional ``timestep_cond`` guidance embedding, SDXL's added pooled-text and size
conditioning), ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``. Latents are ``[B, C, H, W]`` for all of them:
Flux's packed tokens (2x2 patches), its image and text position ids and its ``timestep / 1000`` are made here, as
``FluxPipeline`` makes them. A Flux network with ``guidance_embeds`` (guidance-distilled, like FLUX.1-dev) takes the
guidance scale as an input: no classifier-free guidance is run for it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .schedule import NoiseSchedule


def check_guidance_scale(value, what: str = "guidance_scale"):
    """``value`` if it is ``None`` or a finite number >= 0 (at or below 1: no guidance), else a one-line
    ``ValueError`` naming ``what``. Negative or NaN scales would otherwise be accepted silently."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0 (1 or less: no guidance), got {value!r}.")
    return value


@dataclass
class Conditioning:
    """Inputs of the network besides ``x_t`` and ``t``; every field is optional.

    Args:
        encoder_hidden_states: text embeddings ``[B, L, D]`` (UNet2DConditionModel, SD3).
        pooled_projections: pooled text embeddings ``[B, D]`` (SD3, Flux).
        timestep_cond: guidance-scale embedding ``[B, time_cond_proj_dim]`` (LCM-style UNets).
        text_embeds: pooled text embeddings ``[B, D]`` of SDXL's second text encoder (the UNet's
            ``added_cond_kwargs["text_embeds"]``).
        time_ids: SDXL's size conditioning ``[B, 6]``: original size, crop top-left, target size
            (``added_cond_kwargs["time_ids"]``).
    """

    encoder_hidden_states: torch.Tensor | None = None
    pooled_projections: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def added_cond_kwargs(self) -> dict | None:
        """SDXL's ``added_cond_kwargs`` of ``UNet2DConditionModel`` (``None`` when this is not SDXL conditioning)."""
        if self.text_embeds is None and self.time_ids is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def _map(self, fn) -> "Conditioning":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                for f in fields(self)})

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda x: x.to(*args, **kwargs))

    def index(self, idx) -> "Conditioning":
        """Select rows (e.g. a random subset of a prompt batch)."""
        return self._map(lambda x: x[idx])

    def repeat(self, n: int) -> "Conditioning":
        """Repeat each row ``n`` times (``repeat_interleave``, as diffusers' ``num_images_per_prompt``)."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        first = items[0]
        return replace(first, **{f.name: (None if getattr(first, f.name) is None
                                          else torch.cat([getattr(c, f.name) for c in items]))
                                 for f in fields(first)})


class Prediction:
    """A network output at ``(x_t, t)``, viewable in every parameterisation."""

    def __init__(self, raw: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule):
        self.raw, self.x_t, self.t, self.schedule = raw, x_t, t, schedule
        self._x0_eps = None

    def _pair(self):
        if self._x0_eps is None:
            self._x0_eps = self.schedule.to_x0_eps(self.raw, self.x_t, self.t)
        return self._x0_eps

    @property
    def x0(self) -> torch.Tensor:
        return self._pair()[0]

    @property
    def eps(self) -> torch.Tensor:
        return self._pair()[1]

    @property
    def x0_clipped(self) -> torch.Tensor:
        """x0 clipped to ``[-r, r]`` when the schedule clips (diffusers' ``clip_sample``), as the samplers use it."""
        clip = self.schedule.clip_sample_range
        return self.x0 if clip is None else self.x0.clamp(-clip, clip)

    @property
    def v(self) -> torch.Tensor:
        """``alpha eps - sigma x0`` (diffusers' ``v_prediction``)."""
        return self.schedule.from_x0_eps(*self._pair(), self.t, "v_prediction")

    @property
    def flow(self) -> torch.Tensor:
        """``eps - x0`` (the rectified-flow velocity)."""
        return self.schedule.from_x0_eps(*self._pair(), self.t, "flow")

    def as_type(self, prediction_type: str) -> torch.Tensor:
        return self.schedule.from_x0_eps(*self._pair(), self.t, prediction_type)


# FluxPipeline's default guidance_scale: the guidance input of a guidance-distilled Flux network called without one
DEFAULT_EMBEDDED_GUIDANCE = 3.5


def embeds_guidance(model: nn.Module) -> bool:
    """Whether the network takes the guidance scale as an input (Flux's ``guidance_embeds``) instead of CFG."""
    return bool(getattr(getattr(model, "config", None), "guidance_embeds", False))


def latent_shape(model: nn.Module, sample_size: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the network's latents (unpacked for Flux: ``in_channels / 4`` channels).

    Args:
        model: the denoising network.
        sample_size: latent height = width (the pipeline's ``default_sample_size``); default: the network's
            ``config.sample_size`` (Flux networks have none: then it must be given).
    """
    config = model.config
    size = sample_size if sample_size is not None else getattr(config, "sample_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} has no sample_size: the latent size must be given (the "
                         "pipeline's default_sample_size, or a recipe's data.resolution).")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = config.in_channels // 4 if type(model).__name__ == "FluxTransformer2DModel" else config.in_channels
    return channels, height, width


def bottleneck_module(model: nn.Module) -> nn.Module:
    """The module whose output is the network's bottleneck: the UNet mid block, or the middle block of a
    transformer's (joint / double-stream) blocks."""
    if getattr(model, "mid_block", None) is not None:
        return model.mid_block
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        return blocks[len(blocks) // 2]
    raise TypeError(f"{type(model).__name__} has no mid_block or transformer_blocks to take features from.")


class Denoiser(nn.Module):
    """Wraps a diffusers denoising network with its schedule.

    Args:
        model: a ``UNet2DModel``, ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        schedule: the teacher's :class:`~fastgen.schedule.NoiseSchedule`; its
            ``prediction_type`` says what ``model`` outputs.
        sample_size: the latent size samples are drawn at (:func:`latent_shape`; default: the network's own).
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, sample_size: int | None = None):
        super().__init__()
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel

        if isinstance(model, UNet2DModel):
            self.kind = "unet"
        elif isinstance(model, UNet2DConditionModel):
            self.kind = "unet_cond"
        elif isinstance(model, SD3Transformer2DModel):
            self.kind = "sd3"
        elif isinstance(model, FluxTransformer2DModel):
            self.kind = "flux"
        else:
            raise TypeError(
                f"Denoiser supports UNet2DModel, UNet2DConditionModel, SD3Transformer2DModel and "
                f"FluxTransformer2DModel, not {type(model).__name__}.")
        self.model = model
        self.schedule = schedule
        self.sample_size = sample_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents this denoiser samples (see :func:`latent_shape`)."""
        return latent_shape(self.model, self.sample_size)

    @property
    def embeds_guidance(self) -> bool:
        """The network takes the guidance scale as an input (guidance-distilled Flux): no CFG is run for it."""
        return embeds_guidance(self.model)

    @property
    def is_conditional(self) -> bool:
        return self.kind != "unet"

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None,
                     guidance: torch.Tensor | None = None) -> torch.Tensor:
        """One raw network evaluation (the teacher's own parameterisation); ``guidance``: ``[B]`` scales of a
        network that embeds them."""
        cond = cond or Conditioning()
        if self.kind == "flux":
            return self.flux_output(x_t, t, cond, guidance)
        if self.kind == "unet":
            return self.model(x_t, t).sample
        if self.kind == "unet_cond":
            if cond.encoder_hidden_states is None:
                raise ValueError("UNet2DConditionModel needs Conditioning.encoder_hidden_states.")
            added = cond.added_cond_kwargs()
            if added is None and self.model.config.addition_embed_type == "text_time":
                raise ValueError("This SDXL UNet (addition_embed_type 'text_time') needs Conditioning.text_embeds and "
                                 "time_ids (encode prompts with fastgen.pipelines.generate.encode_prompts).")
            return self.model(x_t, t, encoder_hidden_states=cond.encoder_hidden_states,
                              timestep_cond=cond.timestep_cond, added_cond_kwargs=added).sample
        return self.model(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.encoder_hidden_states,
                          pooled_projections=cond.pooled_projections).sample

    def flux_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance) -> torch.Tensor:
        """``FluxTransformer2DModel`` on ``[B, C, H, W]`` latents: packed into 2x2-patch tokens with their position
        ids, ``timestep = t / 1000``, as ``FluxPipeline`` calls it, and the output unpacked (diffusers' own
        ``_pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``)."""
        from diffusers import FluxPipeline

        if cond.encoder_hidden_states is None or cond.pooled_projections is None:
            raise ValueError("FluxTransformer2DModel needs Conditioning.encoder_hidden_states and pooled_projections.")
        b, c, h, w = x_t.shape
        tokens = FluxPipeline._pack_latents(x_t, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        if self.embeds_guidance:
            guidance = torch.as_tensor(DEFAULT_EMBEDDED_GUIDANCE if guidance is None else guidance,
                                       device=x_t.device, dtype=torch.float32).expand(b)
        else:
            guidance = None
        out = self.model(hidden_states=tokens, timestep=t.to(x_t.dtype) / 1000, guidance=guidance,
                         pooled_projections=cond.pooled_projections, encoder_hidden_states=cond.encoder_hidden_states,
                         txt_ids=txt_ids, img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def fresh_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise of ``like``'s shape drawn as the network's pipeline draws it in its scheduler step: Flux draws
        its packed tokens ``[B, HW/4, 4C]``, unpacked here, so the same seed gives the same noise."""
        from diffusers.utils.torch_utils import randn_tensor

        if self.kind != "flux":
            return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        from diffusers import FluxPipeline

        b, c, h, w = like.shape
        packed = randn_tensor((b, (h // 2) * (w // 2), c * 4), generator=generator, device=like.device,
                              dtype=like.dtype)
        return FluxPipeline._unpack_latents(packed, h, w, 1)

    def forward(self, x_t: torch.Tensor, t, cond: Conditioning | None = None, uncond: Conditioning | None = None,
                guidance_scale: float | None = None) -> Prediction:
        """Predict at ``(x_t, t)``.

        Args:
            x_t: noisy input ``[B, C, H, W]``.
            t: timestep(s), a scalar or ``[B]``, in the network's own units.
            cond: conditioning of the prompts (``None`` for unconditional networks).
            uncond: conditioning of the empty / negative prompt, needed for guidance.
            guidance_scale: classifier-free guidance ``w``: ``uncond + w (cond - uncond)``.
                ``None`` or 1 means no guidance (one network evaluation); a ``[B]`` tensor: one ``w`` per sample.
                A network that embeds guidance (:attr:`embeds_guidance`) is given ``w`` as its input instead
                (``None``: :data:`DEFAULT_EMBEDDED_GUIDANCE`, FluxPipeline's default), in one evaluation.
        """
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.embeds_guidance:
            return Prediction(self.model_output(x_t, t, cond, guidance_scale), x_t, t, self.schedule)
        per_sample = torch.is_tensor(guidance_scale)
        if guidance_scale is None or (not per_sample and guidance_scale == 1.0):
            raw = self.model_output(x_t, t, cond)
        else:
            if uncond is None:
                raise ValueError("Classifier-free guidance needs `uncond` (the empty-prompt conditioning).")
            both = self.model_output(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
            raw_uncond, raw_cond = both.chunk(2)
            w = guidance_scale.to(raw_cond).reshape(-1, *[1] * (raw_cond.ndim - 1)) if per_sample else guidance_scale
            raw = raw_uncond + w * (raw_cond - raw_uncond)
        return Prediction(raw, x_t, t, self.schedule)

    @contextlib.contextmanager
    def capture_features(self):
        """Collect the bottleneck activations of every forward inside the ``with`` block.

        Yields a list that receives one tensor per network evaluation (through a forward hook).
        """
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[-1] if isinstance(output, tuple) else output)

        handle = bottleneck_module(self.model).register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()


__all__ = ["Conditioning", "Prediction", "Denoiser", "bottleneck_module", "check_guidance_scale", "latent_shape",
           "embeds_guidance", "DEFAULT_EMBEDDED_GUIDANCE"]
