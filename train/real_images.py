"""Real images from a folder, streamed: read, resized and center-cropped by DataLoader workers, VAE-encoded per batch.

An image folder of any size (the SD1.5 template names 100k images at 512x512) never sits in memory whole:

* :class:`ImageFolderDataset` -- a torch ``Dataset`` over the folder's files: each image is converted to the
  teacher's channel count, its shorter side resized to the teacher's resolution (bicubic, antialiased) and
  center-cropped to it (torchvision's transforms), as a ``[C, H, W]`` tensor in [-1, 1].
* :class:`RealImageStream` -- the batches of the GAN losses: batch ``k`` is a fixed function of the seed and
  ``k`` (epochs are seeded permutations of the files, each process of a data-parallel run takes its slice), so the
  stream's state is one number -- the batches consumed -- checkpointed with the run; a resumed run reads exactly
  the batches an uninterrupted one reads, whatever the worker count. A ``torch.utils.data.DataLoader`` with
  ``num_workers`` processes reads ahead; latent teachers encode each batch with their VAE (one posterior sample,
  from a generator seeded by the seed and ``k``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from fastgen.pipelines.images import list_image_files


def teacher_image_shape(pipe) -> tuple[int, tuple[int, int]]:
    """``(channels, (height, width))`` of the images a teacher pipeline generates: its VAE's input at the
    latent size (the pipeline's ``default_sample_size``, else the network's) times the VAE's scale factor, or the
    pixel network's own input."""
    from fastgen.denoiser import latent_shape
    from fastgen.pipelines.generate import network_component

    network = getattr(pipe, network_component(pipe))
    channels, height, width = latent_shape(network, getattr(pipe, "default_sample_size", None))
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return channels, (height, width)
    factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.in_channels, (height * factor, width * factor)


def vae_encode(pipe, images: torch.Tensor, generator: torch.Generator, chunk: int = 500,
               progress: bool = False) -> torch.Tensor:
    """Images in [-1, 1] -> the network's space: scaled VAE latents (one posterior sample each, noise from
    ``generator``) for latent teachers, the images themselves for pixel teachers."""
    from tqdm.auto import tqdm

    vae = getattr(pipe, "vae", None)
    if vae is None:
        return images
    out = []
    with torch.no_grad():
        for lo in tqdm(range(0, len(images), chunk), desc="encoding real images", leave=False, disable=not progress):
            dist = vae.encode(images[lo:lo + chunk].to(vae.device, vae.dtype)).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
            if getattr(vae.config, "shift_factor", None):
                z = z - vae.config.shift_factor
            out.append((z * vae.config.scaling_factor).cpu())
    # contiguous like the cached copy a resume reads: the VAE's latents come out channels-last, and a network run on
    # another memory layout sums in another order, so a resumed run would drift from the uninterrupted one
    return torch.cat(out).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """Image files as ``[channels, height, width]`` tensors in [-1, 1], resized and center-cropped.

    Args:
        files: the image files.
        channels: 1 (grey) or 3 (RGB); other modes are converted.
        size: ``(height, width)`` of the output.
    """

    def __init__(self, files: Sequence[Path], channels: int, size: tuple[int, int]):
        from torchvision import transforms

        if channels not in (1, 3):
            raise ValueError(f"Real images for a teacher with {channels} image channels are not supported (1 or 3).")
        self.files, self.mode = [Path(f) for f in files], "L" if channels == 1 else "RGB"
        self.transform = transforms.Compose([
            transforms.Resize(max(size), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(size), transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[index]) as image:
                pixels = self.transform(image.convert(self.mode))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ValueError(f"Real image {self.files[index]} cannot be read: {err}") from None
        return pixels.float() / 127.5 - 1.0


class _Batches(torch.utils.data.Sampler):
    """The index lists of batches ``start, start + 1, ...`` of a :class:`RealImageStream` (endless)."""

    def __init__(self, stream: "RealImageStream", start: int):
        self.stream, self.start = stream, start

    def __iter__(self):
        k = self.start
        while True:
            yield self.stream.indices(k)
            k += 1


class RealImageStream:
    """An endless, checkpointable stream of real batches from an image folder, in the teacher's network space.

    Args:
        pipe: the teacher pipeline (its image shape; its VAE encodes the batches of latent teachers).
        folder: the image folder (files directly inside it; any sizes).
        batch_size: images per batch (per process).
        seed: seed of the epoch permutations and of the VAE's posterior samples.
        max_images: use at most this many files (a fixed seeded subset).
        num_workers: DataLoader worker processes (0: read in the training process).
        num_shards, shard: processes sharing the stream and which of them this is (each reads its slice of
            every global batch).
    """

    def __init__(self, pipe, folder: str | Path, batch_size: int, seed: int = 0, max_images: int | None = None,
                 num_workers: int = 2, num_shards: int = 1, shard: int = 0):
        files = list_image_files(folder)
        if max_images is not None and len(files) > max_images:
            pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:max_images]
            files = [files[i] for i in sorted(pick.tolist())]
        channels, size = teacher_image_shape(pipe)
        self.dataset = ImageFolderDataset(files, channels, size)
        self.dataset[0]  # an unreadable first image fails now, before training
        self.pipe, self.batch_size, self.seed, self.num_workers = pipe, batch_size, seed, num_workers
        self.num_shards, self.shard = num_shards, shard
        self.position = 0  # batches consumed: the stream's whole state
        self._loader = None
        self._permutation = (-1, None)

    def indices(self, k: int) -> list[int]:
        """The dataset indices of batch ``k`` of this shard: positions ``k * B * shards ...`` of the sequence of
        epochs, each a permutation of the files seeded by ``(seed, epoch)``."""
        n, per = len(self.dataset), self.batch_size * self.num_shards
        out = []
        for p in range(k * per + self.shard * self.batch_size, k * per + (self.shard + 1) * self.batch_size):
            epoch, offset = divmod(p, n)
            if self._permutation[0] != epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._permutation = (epoch, torch.randperm(n, generator=gen))
            out.append(int(self._permutation[1][offset]))
        return out

    def _batches(self):
        # its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, which would
        # shift the training noise by where in the run the reader starts (the transforms draw no random numbers)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_Batches(self, self.position),
                                             num_workers=self.num_workers, prefetch_factor=2 if self.num_workers else None,
                                             generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)

    def next_batch(self) -> torch.Tensor:
        """The next batch in the network's space (``[B, C, h, w]``; latents for latent teachers)."""
        if self._loader is None:
            self._loader = self._batches()
        images = next(self._loader)
        generator = torch.Generator().manual_seed((self.seed * 2**32 + self.position) % 2**63)
        self.position += 1
        return vae_encode(self.pipe, images, generator)

    def state_dict(self) -> dict:
        return {"real_position": torch.tensor([self.position], dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.position = int(state["real_position"][0]) if "real_position" in state else 0

    def close(self) -> None:
        """Stop the DataLoader's workers (they read ahead; a new iterator starts at ``position``)."""
        self._loader = None


__all__ = ["ImageFolderDataset", "RealImageStream", "teacher_image_shape", "vae_encode"]
