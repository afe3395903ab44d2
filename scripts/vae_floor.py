"""The floor a latent student cannot go below: real train images encoded and decoded by a zoo teacher's VAE,
scored like generated images (every domain metric against the real test split), beside the real-data floor.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/vae_floor.py --teacher fmnist-ldm --num-images 2000

Images per class follow the evaluation's prompts (image i is of class i % 10), so the per-class FD compares
sets of the same size as `fastgen eval --num-images N`. Decoding uses the VAE's mean latent (no sampling).
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import AutoencoderKL

from fastgen import zoo
from fastgen.eval.classifiers import real_images_of_classes
from fastgen.eval.evaluate import domain_scores, real_floor

METRICS = ["fd", "fd_class", "fd_pixel", "precision", "recall", "density", "coverage", "acc"]


def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Encode ``images`` in [0, 1] to the VAE's mean latent and decode them back to [0, 1]."""
    out = []
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            x = images[lo:lo + batch_size] * 2 - 1
            out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="fmnist-ldm", help="a zoo teacher with a VAE (default fmnist-ldm)")
    parser.add_argument("--num-images", type=int, default=2000)
    args = parser.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(zoo.path(args.teacher), subfolder="vae", use_safetensors=True).eval()
    labels = torch.arange(args.num_images) % 10
    images = real_images_of_classes(args.teacher, labels, "train", seed=1)
    result = {"vae_reconstruction": domain_scores(reconstruct(vae, images), labels, args.teacher, METRICS),
              "real_data": real_floor(args.teacher, args.num_images, METRICS, labels)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
