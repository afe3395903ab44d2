"""Real datasets of the zoo, as float tensors in [-1, 1] with integer labels.

* 8x8 digits from scikit-learn (1,797 images; split 1,497 train / 300 test with a fixed seed).
* Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (60k train / 10k test, 28x28
  padded with background to 32x32).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from fastgen.checks import check_choice

FASHION_MNIST_DIR = Path(os.environ.get("FASTGEN_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``([N, 1, 8, 8] in [-1, 1], [N] labels)``; ``split`` is train/test/all."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:300], order[300:]
    pick = {"train": train, "test": test, "all": order}
    check_choice("split", split, pick)
    return images[pick[split]], labels[pick[split]]


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def check_fashion_mnist(splits=("train", "test")) -> tuple[Path, Path]:
    """``(images file, labels file)`` of the last of ``splits``, after checking every split's files exist;
    ``FileNotFoundError`` saying how to install them otherwise (commands check this before any long work)."""
    for split in splits:
        check_choice("split", split, ("train", "test"))
        prefix = {"train": "train", "test": "t10k"}[split]
        images_file = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
        labels_file = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
        if not images_file.is_file() or not labels_file.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST not found at {FASHION_MNIST_DIR} (missing {images_file.name}); install it with "
                "`apt-get install -y dataset-fashion-mnist` or set FASTGEN_FASHION_MNIST to a folder with the idx "
                "files.")
    return images_file, labels_file


def load_fashion_mnist(split: str = "train", pad_to: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as ``([N, 1, pad_to, pad_to] in [-1, 1], [N] labels)``; ``split`` is train/test."""
    images_file, labels_file = check_fashion_mnist((split,))
    images = torch.from_numpy(_read_idx(images_file, 16).reshape(-1, 1, 28, 28).copy()).float() / 255.0 * 2 - 1
    labels = torch.from_numpy(_read_idx(labels_file, 8).astype(np.int64))
    pad = (pad_to - 28) // 2
    if pad > 0:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=-1.0)
    return images, labels
