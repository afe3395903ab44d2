"""Image grids: tensors in [0, 1] to PNG files, plain or with row / column labels."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


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
