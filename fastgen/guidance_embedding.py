"""Guidance-conditioned students: the teacher's network taking the guidance scale as an input (LCM's w-embedding).

Instead of running classifier-free guidance (two network calls per step), a guidance-conditioned student
gets the guidance scale as a second timestep-like input, so one call gives the guided prediction. diffusers
supports this in ``UNet2DConditionModel`` through ``time_cond_proj_dim``: its ``TimestepEmbedding`` adds
``cond_proj(timestep_cond)`` to the sinusoidal timestep features before its first linear layer, and
``StableDiffusionPipeline`` (like ``LatentConsistencyModelPipeline``), when ``unet.config.time_cond_proj_dim``
is set, embeds ``w = guidance_scale - 1`` with ``get_guidance_scale_embedding``, passes it as
``timestep_cond`` and skips CFG. So an exported student is called as
``pipe(prompt, num_inference_steps=N, guidance_scale=W)``, like any LCM.

:func:`guidance_conditioned_network` rebuilds the teacher's UNet with ``time_cond_proj_dim``, copies its weights
and zero-initialises ``cond_proj`` (a linear layer without bias): the added term is then exactly 0 and the student
starts as the teacher for every ``W`` (LCM's reference script initialises it randomly instead).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .denoiser import Conditioning
from .lora import base_copy

EMBEDDING_DIM = 256  # time_cond_proj_dim of the LCM students (LCM-Dreamshaper, the reference script)
CAPABLE = "UNet2DConditionModel"  # the diffusers networks with a guidance embedding (time_cond_proj_dim)


def takes_guidance_embedding(model: nn.Module) -> bool:
    """Whether ``model`` can be rebuilt with diffusers' guidance embedding (``time_cond_proj_dim``)."""
    from diffusers import UNet2DConditionModel

    return isinstance(model, UNet2DConditionModel)


def check_guidance_network(model: nn.Module, what: str) -> None:
    """A one-line ``ValueError`` when ``model`` cannot take a guidance embedding; ``what`` names the option asking."""
    if not takes_guidance_embedding(model):
        raise ValueError(f"{what} needs a teacher network that takes diffusers' guidance embedding (time_cond_proj_dim): "
                         f"{CAPABLE}; this teacher's network is a {type(model).__name__}.")


def guidance_conditioned_network(model: nn.Module, dim: int = EMBEDDING_DIM) -> nn.Module:
    """A trainable copy of the teacher's ``UNet2DConditionModel`` with a guidance embedding of width ``dim``.

    Every weight is the teacher's; the new ``time_embedding.cond_proj`` is zero, so the copy computes exactly the
    teacher's output whatever the guidance input. A teacher that already has an embedding is copied as it is.

    Args:
        model: the teacher network (peft adapters on it are not copied).
        dim: ``time_cond_proj_dim``, the width of the embedding of ``w``.
    """
    check_guidance_network(model, "A guidance-conditioned student")
    base = base_copy(model)
    if base.config.time_cond_proj_dim is not None:
        return base
    config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    student = type(base).from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"Rebuilding {type(base).__name__} with a guidance embedding changed more than cond_proj: "
                           f"missing {missing}, unexpected {unexpected}.")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    param = next(base.parameters())
    if (param.device, param.dtype) != (student.device, student.dtype):
        student = student.to(device=param.device, dtype=param.dtype)
    return student.requires_grad_(True)


def embedding_dim(model: nn.Module) -> int | None:
    """The network's ``time_cond_proj_dim`` (``None``: it takes no guidance embedding)."""
    return getattr(getattr(model, "config", None), "time_cond_proj_dim", None)


def guidance_embedding(guidance_scale: torch.Tensor | float, n: int, dim: int) -> torch.Tensor:
    """``[n, dim]``: the embedding a ``StableDiffusionPipeline`` feeds for ``guidance_scale`` (of ``w = W - 1``).

    Computed by diffusers' own ``get_guidance_scale_embedding``, which reads no pipeline state.

    Args:
        guidance_scale: the pipeline's ``guidance_scale`` ``W`` (diffusers' convention, ``uncond + W (cond -
            uncond)``), a number or one per sample.
        n: the number of samples.
        dim: the network's ``time_cond_proj_dim``.
    """
    from diffusers import StableDiffusionPipeline

    w = (torch.as_tensor(guidance_scale, dtype=torch.float64).cpu() - 1).float()  # as the pipeline: W - 1, then float32
    w = w.expand(n) if w.ndim == 0 else w
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def with_guidance(cond: Conditioning, guidance_scale: torch.Tensor | float, dim: int) -> Conditioning:
    """``cond`` with ``timestep_cond`` = the guidance embedding of ``guidance_scale`` (on its device and dtype)."""
    states = cond.encoder_hidden_states
    emb = guidance_embedding(guidance_scale, len(states), dim).to(device=states.device, dtype=states.dtype)
    return replace(cond, timestep_cond=emb)


def call_guidance(guidance_range: tuple[float, float], chosen: float | None, recommended: float | None) -> float:
    """The ``W`` a guidance-conditioned student's exported call is made with: ``chosen``, else the teacher's
    ``recommended`` one when it lies in the trained ``guidance_range``, else the range's middle."""
    lo, hi = guidance_range
    if chosen is not None:
        return float(chosen)
    if recommended is not None and lo <= recommended <= hi:
        return float(recommended)
    return (lo + hi) / 2


__all__ = ["call_guidance", "EMBEDDING_DIM", "CAPABLE", "takes_guidance_embedding", "check_guidance_network",
           "guidance_conditioned_network", "embedding_dim", "guidance_embedding", "with_guidance"]
