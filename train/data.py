"""Training data: prompts, real images and cached teacher ODE pairs, served as :class:`~fastgen.methods.Batch`es.

* Prompts (data-free methods: DMD2 without GAN, SiD): a text file with one prompt per line, or the
  zoo's class prompts (``"zoo"``). They are encoded once by the teacher pipeline's own
  ``encode_prompt``; batches index into that table.
* Real images (GAN losses): a zoo dataset (``"zoo"``: Fashion-MNIST for fmnist-ldm, 8x8 digits for
  digits-ddpm, with class prompts as their conditioning; encoded once with the pipeline's VAE and cached) or an
  image folder of any size and resolution, streamed (:mod:`.real_images`: resized and center-cropped by
  DataLoader workers, VAE-encoded per batch; conditioned on the empty prompt).
* Teacher ODE pairs (DMD's regression loss): noise and the teacher's deterministic DDIM sample from
  it, generated once with fastgen's DDIM sampler and cached to a file.

:class:`BatchStream` draws batches with its own ``torch.Generator``, whose state is checkpointed,
so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fastgen import zoo
from fastgen.denoiser import Conditioning
from fastgen.methods.base import Batch
from fastgen.pipelines.generate import encode_prompts
from fastgen.pipelines.prompts import load_prompts
from fastgen.pipelines.sampler import sample_ddim, student_timesteps

from .real_images import RealImageStream, vae_encode


def read_cache(path: Path | None, key: dict) -> tuple[dict, dict] | None:
    """``(tensors, extra)`` of a cache file written by :func:`write_cache` for the same ``key``, else ``None``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fastgen", "{}"))
        if meta.get("key") != key:
            return None
        return load_file(str(path)), meta.get("extra", {})
    except (SafetensorError, OSError, ValueError):  # unreadable (e.g. not a cache of this version): rebuild it
        return None


def write_cache(path: Path | None, key: dict, tensors: dict, extra: dict | None = None) -> None:
    """Cache ``tensors`` (``None`` values left out) with ``key`` and JSON ``extra`` as one safetensors file,
    written to a temporary file and renamed: a kill never leaves a truncated cache, and no pickle is loaded."""
    from safetensors.torch import save_file

    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, str(tmp),
              metadata={"fastgen": json.dumps({"key": key, "extra": extra or {}})})
    os.replace(tmp, path)


class PromptBank:
    """The conditioning of a prompt list, encoded once (in chunks) with the pipeline's text encoder.

    Args:
        pipe: the teacher pipeline (text-conditional).
        prompts: the prompts.
        device: where the table lives.
    """

    def __init__(self, pipe, prompts: Sequence[str], device="cpu", chunk: int = 256):
        self.prompts = list(prompts)
        conds = []
        with torch.no_grad():
            for lo in range(0, len(self.prompts), chunk):
                cond, uncond = encode_prompts(pipe, self.prompts[lo:lo + chunk])
                conds.append(cond.to("cpu"))
        self.cond = Conditioning.cat(conds).to(device)
        self.uncond = uncond.index(slice(0, 1)).to(device)  # the empty prompt, one row

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, idx: torch.Tensor) -> tuple[Conditioning, Conditioning]:
        """``(cond, uncond)`` rows for prompt indices ``idx``."""
        return self.cond.index(idx.to(self.cond.encoder_hidden_states.device)), self.uncond.repeat(len(idx))


@dataclass
class RealData:
    """Real samples in the network's space and the prompt index of each (``None``: the empty prompt)."""

    samples: torch.Tensor
    labels: torch.Tensor | None
    prompts: list[str] | None


def load_real(pipe, source: str, zoo_name: str | None, max_images: int = 10000, cache: Path | None = None,
              seed: int = 0) -> RealData:
    """The zoo teacher's dataset (``data.real = "zoo"``) as real samples for GAN losses, encoded once and cached.
    (Image folders are streamed instead: :class:`~.real_images.RealImageStream`.)

    Args:
        pipe: the teacher pipeline (its VAE encodes images of latent teachers).
        source: ``"zoo"``.
        zoo_name: the zoo teacher the pipeline is.
        max_images: use at most this many images (a fixed random subset).
        cache: file to cache the encoded samples in (reused when its source matches).
    """
    if source != "zoo":
        raise ValueError(f"load_real reads the zoo's datasets; stream the image folder {source!r} with RealImageStream.")
    key = {"source": str(source), "zoo": zoo_name, "max_images": max_images, "seed": seed}
    cached = read_cache(cache, key)
    if cached is not None:
        tensors, extra = cached
        return RealData(tensors["samples"], tensors.get("labels"), extra["prompts"])
    if zoo_name is None:
        raise ValueError('data.real = "zoo" needs a zoo teacher; give an image folder for other teachers.')
    from fastgen.zoo.data import load_digits, load_fashion_mnist

    fmnist = zoo_name in zoo.FMNIST_TEACHERS
    images, labels = load_fashion_mnist("train") if fmnist else load_digits("train")
    prompts = zoo.prompts() if fmnist else None
    labels = labels if prompts is not None else None
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]
    images = images[pick]
    labels = labels[pick] if labels is not None else None
    samples = vae_encode(pipe, images, torch.Generator().manual_seed(seed), progress=True)
    write_cache(cache, key, {"samples": samples, "labels": labels}, {"prompts": prompts})
    return RealData(samples, labels, prompts)


@dataclass
class OdePairs:
    """Cached teacher ODE pairs: noise, the teacher's DDIM sample from it, and the prompt index of each."""

    noise: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None


def teacher_ode_pairs(pipe, teacher, bank: PromptBank | None, num_pairs: int, num_steps: int = 50,
                      guidance_scale: float | None = None, cache: Path | None = None, seed: int = 0,
                      batch_size: int = 250) -> OdePairs:
    """Generate (or load from ``cache``) ``num_pairs`` teacher ODE pairs with fastgen's DDIM sampler.

    Args:
        pipe: the teacher pipeline (for the latent shape).
        teacher: the teacher :class:`~fastgen.denoiser.Denoiser`.
        bank: the prompts (pair ``i`` uses prompt ``i % len(bank)``); ``None`` for unconditional teachers.
        num_pairs: how many pairs.
        num_steps: DDIM steps (trailing spacing) of the teacher's deterministic sampler.
        guidance_scale: the teacher's classifier-free guidance.
        cache: file to cache the pairs in (reused when the settings match).
        seed: seed of the noise.
    """
    key = {"num_pairs": num_pairs, "num_steps": num_steps, "guidance_scale": guidance_scale, "seed": seed,
           "teacher": str(getattr(pipe, "name_or_path", "")), "prompts": bank.prompts if bank is not None else None}
    cached = read_cache(cache, key)
    if cached is not None:
        tensors, _ = cached
        return OdePairs(tensors["noise"], tensors["target"], tensors.get("labels"))
    shape = teacher.latent_shape
    device = next(teacher.model.parameters()).device
    noise = torch.randn((num_pairs, *shape), generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(num_pairs) % len(bank) if bank is not None else None
    timesteps = student_timesteps(teacher.schedule, num_steps, "ddim")
    targets = []
    with torch.no_grad():
        for lo in tqdm(range(0, num_pairs, batch_size), desc="teacher ODE pairs"):
            z = noise[lo:lo + batch_size].to(device)
            cond = uncond = None
            if bank is not None:
                cond, uncond = bank(labels[lo:lo + batch_size])
            targets.append(sample_ddim(teacher, z, timesteps, cond, uncond, guidance_scale).cpu())
    pairs = OdePairs(noise, torch.cat(targets), labels)
    write_cache(cache, key, {"noise": pairs.noise, "target": pairs.target, "labels": labels})
    if cache is not None:
        (cache.with_suffix(".json")).write_text(json.dumps(key, indent=1))
    return pairs


class BatchStream:
    """An endless stream of :class:`~fastgen.methods.Batch`es, drawn with its own generator.

    Args:
        batch_size: student samples per batch.
        prompts: the prompt table (text-conditional teachers) or ``None``.
        real: real samples for GAN losses (in memory, or streamed from an image folder), or ``None``.
        real_bank: the conditioning of ``real``'s labels (its class prompts), or ``None`` (empty prompt).
        pairs: teacher ODE pairs (DMD), or ``None``.
        pair_batch_size: pairs per batch.
        seed: seed of the stream's generator (its state is saved in checkpoints).
        device: where batches go.
        num_shards: processes sharing the stream (data parallel) ...
        shard: ... and which of them this is. Every process draws the indices of all ``num_shards``
            batches from the same generator and keeps its own slice, so the processes see different
            data while their generators stay equal (accelerate checkpoints the main process's state).
    """

    def __init__(self, batch_size: int, prompts: PromptBank | None = None, real: RealData | RealImageStream | None = None,
                 real_bank: PromptBank | None = None, pairs: OdePairs | None = None, pair_batch_size: int = 0,
                 seed: int = 0, device="cpu", num_shards: int = 1, shard: int = 0):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}.")
        self.batch_size, self.prompts, self.real, self.real_bank = batch_size, prompts, real, real_bank
        self.pairs, self.pair_batch_size, self.device = pairs, pair_batch_size or batch_size, device
        self.num_shards, self.shard = num_shards, shard
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def _draw(self, n: int, high: int) -> torch.Tensor:
        """``n`` random indices below ``high``: this shard's slice of ``n * num_shards``."""
        return torch.randint(high, (self.num_shards, n), generator=self.generator)[self.shard]

    def _cond(self, bank: PromptBank | None, labels: torch.Tensor | None, n: int):
        if self.prompts is None:
            return None
        if bank is None or labels is None:  # the empty prompt
            return self.prompts.uncond.repeat(n)
        return bank(labels)[0]

    def __next__(self) -> Batch:
        batch = Batch(self.batch_size)
        if self.prompts is not None:
            batch.cond, batch.uncond = self.prompts(self._draw(self.batch_size, len(self.prompts)))
        if isinstance(self.real, RealImageStream):  # an image folder: its own checkpointed stream, the empty prompt
            batch.real = self.real.next_batch()
            batch.real_cond = self._cond(None, None, self.batch_size)
        elif self.real is not None:
            idx = self._draw(self.batch_size, len(self.real.samples))
            batch.real = self.real.samples[idx]
            labels = self.real.labels[idx] if self.real.labels is not None else None
            batch.real_cond = self._cond(self.real_bank, labels, self.batch_size)
        if self.pairs is not None:
            idx = self._draw(self.pair_batch_size, len(self.pairs.noise))
            batch.pair_noise, batch.pair_target = self.pairs.noise[idx], self.pairs.target[idx]
            labels = self.pairs.labels[idx] if self.pairs.labels is not None else None
            batch.pair_cond = self._cond(self.prompts, labels, self.pair_batch_size)
        return batch.to(self.device)

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if isinstance(self.real, RealImageStream):
            state.update(self.real.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if isinstance(self.real, RealImageStream):
            self.real.load_state_dict(state)

    def close(self) -> None:
        """Stop the image folder stream's reader processes, if any."""
        if isinstance(self.real, RealImageStream):
            self.real.close()


__all__ = ["load_prompts", "PromptBank", "RealData", "load_real", "RealImageStream", "OdePairs", "teacher_ode_pairs",
           "BatchStream"]
