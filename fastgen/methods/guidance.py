"""Distilling classifier-free guidance into a student: the options guided progressive distillation and LCM share.

The teacher runs CFG at a scale ``w`` drawn per sample from ``[guidance_min, guidance_max]`` (diffusers' convention,
``uncond + w (cond - uncond)``; LCM's reference script writes ``1 + w``). A guidance-conditioned student
(:mod:`fastgen.guidance_embedding`) is told ``w`` and exported so that ``pipe(..., guidance_scale=W)`` picks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgen.denoiser import Conditioning, check_guidance_scale
from fastgen.guidance_embedding import call_guidance, with_guidance

from .base import option


@dataclass
class GuidanceRangeOptions:
    """The guidance a method distils (the start of its recipe section)."""

    guidance_min: float | None = option(None, "the teacher's CFG scale w ~ U[guidance_min, guidance_max] per sample "
                                              "(diffusers' convention: 1 = no guidance), distilled into the student; "
                                              "unset: none")
    guidance_max: float | None = option(None, "see guidance_min")
    guidance_scale: float | None = option(None, "the W of the exported call pipe(..., guidance_scale=W) of a "
                                                "guidance-conditioned student; default: the teacher's recommended one "
                                                "if in the range, else the range's middle")
    embedding_dim: int = option(256, "width of a guidance-conditioned student's embedding of w (time_cond_proj_dim)")

    @property
    def guided(self) -> bool:
        return self.guidance_min is not None

    def validate(self) -> None:
        if (self.guidance_min is None) != (self.guidance_max is None):
            raise ValueError("guidance_min and guidance_max go together, or neither (no guidance).")
        if self.guided:
            check_guidance_scale(self.guidance_min, "guidance_min")
            check_guidance_scale(self.guidance_max, "guidance_max")
            if self.guidance_min > self.guidance_max:
                raise ValueError(f"guidance_min ({self.guidance_min}) must be <= guidance_max ({self.guidance_max}).")
        check_guidance_scale(self.guidance_scale)
        if self.guidance_scale is not None and not self.guided:
            raise ValueError("guidance_scale is the exported call's W of a guided student; set guidance_min and "
                             "guidance_max.")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}.")


class DistilledGuidance:
    """The guidance range of a method at work: draws ``w`` and feeds it to a guidance-conditioned student.

    Args:
        options: the method's :class:`GuidanceRangeOptions`.
        embedded: whether the student takes ``w`` through its embedding (else it is trained at the drawn ``w``
            without being told, as LCM-LoRA).
        recommended: the teacher's recommended guidance (the default ``W`` of the exported call).
    """

    def __init__(self, options: GuidanceRangeOptions, embedded: bool, recommended: float | None):
        self.range = (options.guidance_min, options.guidance_max) if options.guided else None
        self.dim = options.embedding_dim if embedded and self.range is not None else None
        self.call = call_guidance(self.range, options.guidance_scale, recommended) if self.dim else 0.0

    def draw(self, n: int, device) -> torch.Tensor | None:
        """``w ~ U[guidance_min, guidance_max]``, one per sample (``None`` without guidance)."""
        if self.range is None:
            return None
        lo, hi = self.range
        return lo + (hi - lo) * torch.rand(n, device=device)

    def student_cond(self, cond: Conditioning | None, w) -> Conditioning | None:
        """The student's conditioning: with the embedding of ``w`` when the student takes it."""
        return cond if self.dim is None or cond is None else with_guidance(cond, w, self.dim)


__all__ = ["GuidanceRangeOptions", "DistilledGuidance"]
