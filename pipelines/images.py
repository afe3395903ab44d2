"""Images on disk: grids of tensors in [0, 1] as PNG files (plain or with row / column labels), and image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def size_tuple(size) -> tuple[int, int] | None:
    """``(H, W)`` from an int, a pair or ``None``."""
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def list_image_files(folder: str | Path, min_images: int = 1) -> list[Path]:
    """Sorted image files (by extension, see ``IMAGE_EXTENSIONS``) directly inside ``folder``.

    Args:
        folder: the image folder.
        min_images: fewest images accepted; a folder with fewer raises ``ValueError``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Image folder {folder} does not exist" + (" (it is a file)." if folder.exists() else "."))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"Image folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    if len(files) < min_images:
        raise ValueError(f"Image folder {folder} has {len(files)} image(s), at least {min_images} needed"
                         + ".")
    return files


def load_image_folder(path: str | Path, expected_size: int | Sequence[int] | None = None,
                      expected_channels: int | None = None, min_images: int = 1) -> torch.Tensor:
    """All images of a folder as one ``[N, C, H, W]`` float tensor in [0, 1] (files sorted by name).

    Grey images (PIL modes ``L``, ``I``, ``F``, ``1``, ``LA``) load with 1 channel, everything else
    as RGB with 3. Raises a one-line ``ValueError`` for a missing folder, a folder without images,
    too few images, or images of the wrong / mixed size or channel count.

    Args:
        path: the image folder (not searched recursively).
        expected_size: required ``H = W`` (an int) or ``(H, W)``; ``None``: any, but all equal.
        expected_channels: required channel count (1 or 3); ``None``: any, but all equal.
        min_images: fewest images accepted.
    """
    from PIL import Image

    files = list_image_files(path, min_images=min_images)
    size = size_tuple(expected_size)
    arrays = []
    for file in files:
        with Image.open(file) as img:
            grey = img.mode in ("L", "I", "I;16", "F", "1", "LA")
            img = img.convert("L" if grey else "RGB")
            array = np.asarray(img, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        hw, channels = array.shape[1:], array.shape[0]
        if size is not None and hw != size:
            raise ValueError(f"{file}: expected images of size {size[0]}x{size[1]}, got {hw[0]}x{hw[1]}.")
        if expected_channels is not None and channels != expected_channels:
            raise ValueError(f"{file}: expected {expected_channels} channel(s), got {channels}.")
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(f"{file}: shape {list(array.shape)} differs from {files[0].name}'s "
                             f"{list(arrays[0].shape)}; all images of a folder must match.")
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def to_grid(images: torch.Tensor, nrow: int, padding: int = 1) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] -> one ``[3, H', W']`` grid with ``nrow`` images per row (torchvision)."""
    from torchvision.utils import make_grid

    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return make_grid(images.float().cpu(), nrow=nrow, padding=padding, pad_value=1.0)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 4) -> Path:
    """Save ``[N, C, H, W]`` images in [0, 1] as a PNG grid, upscaled ``scale`` times (nearest)."""
    from torchvision.transforms.functional import to_pil_image

    grid = to_grid(images, nrow)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil_image(grid).save(path)
    return path


def save_panels(panels: dict[str, torch.Tensor], path: str | Path, nrow: int, row_labels: Sequence[str] = (),
                title: str | None = None) -> Path:
    """Side-by-side labelled panels (e.g. one per step count), each a grid of ``nrow`` images per row.

    Args:
        panels: ``{column title: [N, C, H, W] images in [0, 1]}``, all with the same ``N``.
        row_labels: optional labels of the grid rows, written left of the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {name: to_grid(images, nrow) for name, images in panels.items()}
    first = next(iter(grids.values()))
    height, width = first.shape[1:]
    inches = max(1 / 40, 3 / width)  # at least 3 inches per panel, so 8x8 images stay visible
    fig, axes = plt.subplots(1, len(grids), figsize=(len(grids) * width * inches + 1.2, height * inches + 0.6),
                             squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if row_labels:
        rows = len(row_labels)
        axes[0][0].set_yticks([(i + 0.5) * height / rows for i in range(rows)])
        axes[0][0].set_yticklabels(row_labels, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
