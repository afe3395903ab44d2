"""Image sets of known quality made from real images: what each metric must rank below real data.

A metric is only trusted when it ranks sets whose defect is known by construction. Each probe is
made from real *train* images and scored against the real test split like a generated set:

* ``full`` -- real train images, the same number per class (the reference point: a perfect
  generator);
* ``keep 10%`` / ``keep 1%`` -- each class keeps only 10% / 1% of its images, repeated to the full
  size (lost diversity: every image is real, but there are few of them);
* ``most typical 20%`` -- each class keeps the 20% of its images the domain classifier is most
  sure of, repeated to the full size (lost diversity towards the class prototypes: what strong
  classifier-free guidance does);
* ``blurred`` -- the full set, 3x3 box blur (lost fidelity, diversity intact);
* ``wrong proportions`` -- real images, class c drawn in proportion to c + 1 (class 9 ten times
  as often as class 0).

``python -m fastgen.eval.probes fmnist`` prints every domain metric of every probe as a table
(docs/evaluation.md); the tests assert the rankings.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .classifiers import NUM_CLASSES, classifier_for, real_images_of_classes
from .metrics import blur


def balanced_labels(per_class: int) -> torch.Tensor:
    """``per_class * 10`` labels cycling through the classes (image ``i`` is of class ``i % 10``, as prompted)."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}.")
    return torch.arange(per_class * NUM_CLASSES) % NUM_CLASSES


def keep_fraction(images: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """The images with each class reduced to its first ``ceil(fraction * count)`` images, repeated to the same count.

    The result has the shape, labels and class proportions of ``images``, but fewer distinct
    images: a set that lost diversity and nothing else.

    Args:
        images: ``[N, C, H, W]``.
        labels: ``N`` class indices.
        fraction: share of each class's images kept, in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    labels = torch.as_tensor(labels)
    if len(labels) != len(images):
        raise ValueError(f"keep_fraction: {len(images)} images but {len(labels)} labels.")
    out = images.clone()
    for c in labels.unique().tolist():
        where = torch.nonzero(labels == c).flatten()
        kept = where[:math.ceil(fraction * len(where))]
        out[where] = images[kept[torch.arange(len(where)) % len(kept)]]
    return out


def keep_most_typical(images: torch.Tensor, labels: torch.Tensor, fraction: float, classifier) -> torch.Tensor:
    """The images with each class reduced to the ``fraction`` the classifier is surest of, repeated to the same count.

    Args:
        images: ``[N, 1, S, S]`` in [0, 1].
        labels: ``N`` class indices.
        fraction: share of each class's images kept, in (0, 1].
        classifier: ``"digits"`` / ``"fmnist"`` or a zoo teacher name (the judge of typicality).
    """
    from .classifiers import extract, load_classifier

    labels = torch.as_tensor(labels)
    probability = extract(load_classifier(classifier), images, "logits").softmax(1)[torch.arange(len(labels)), labels]
    order = probability.argsort(descending=True)  # most typical first: keep_fraction keeps each class's first images
    return keep_fraction(images[order], labels[order], fraction)[order.argsort()]


def proportional_labels(n: int) -> torch.Tensor:
    """``n`` labels with class ``c`` in proportion to ``c + 1`` (largest remainders; shuffled with seed 0)."""
    weights = torch.arange(1, NUM_CLASSES + 1, dtype=torch.float64)
    exact = n * weights / weights.sum()
    counts = exact.floor().long()
    counts[(exact - counts).argsort(descending=True)[:n - int(counts.sum())]] += 1
    labels = torch.repeat_interleave(torch.arange(NUM_CLASSES), counts)
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def probe_sets(name: str, per_class: int = 200, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The probes of the module docstring: ``{probe name: (images, labels)}``, each of ``per_class * 10`` images.

    Args:
        name: ``"digits"`` / ``"fmnist"`` or a zoo teacher name.
        per_class: images per class of the full set (digits has about 150 per class in its train split).
        seed: seed of the draws from the train split.
    """
    name = classifier_for(name)
    labels = balanced_labels(per_class)
    full = real_images_of_classes(name, labels, "train", seed=seed)
    skewed = proportional_labels(len(labels))
    return {
        "full": (full, labels),
        "keep 10%": (keep_fraction(full, labels, 0.1), labels),
        "keep 1%": (keep_fraction(full, labels, 0.01), labels),
        "most typical 20%": (keep_most_typical(full, labels, 0.2, name), labels),
        "blurred": (blur(full, 3), labels),
        "wrong proportions": (real_images_of_classes(name, skewed, "train", seed=seed), skewed),
    }


# Columns of the probe table: (result key, header, digits).
COLUMNS = (("fd", "FD", 2), ("fd_class", "per-class FD", 2), ("fd_pixel", "pixel FD", 2),
           ("precision", "precision", 3), ("recall", "recall", 3), ("density", "density", 3),
           ("coverage", "coverage", 3), ("acc", "accuracy", 3))


def probe_table(name: str, per_class: int = 200, seed: int = 0) -> str:
    """Every domain metric (and the FD of each feature group) of every probe, as one Markdown table."""
    from .evaluate import DOMAIN_METRICS, GROUP_KEY, domain_scores, fmt

    metrics = [m for m in DOMAIN_METRICS if m != "kid"]
    rows = {probe: domain_scores(images, labels, name, metrics)
            for probe, (images, labels) in probe_sets(name, per_class, seed).items()}
    groups = [key for key in rows["full"] if key.startswith(GROUP_KEY.format(""))]
    columns = [*COLUMNS, *((key, key[len(GROUP_KEY.format("")):], 3) for key in groups)]
    lines = ["| set | " + " | ".join(header for _, header, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for probe, row in rows.items():
        lines.append(f"| {probe} | " + " | ".join(fmt(row.get(key), digits) for key, _, digits in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.eval.probes NAME [--per-class N] [--seed S]``: print the probe table."""
    parser = argparse.ArgumentParser(prog="python -m fastgen.eval.probes",
                                     description="Score image sets of known quality (made from real train images) "
                                                 "with every domain metric.")
    parser.add_argument("name", choices=["digits", "fmnist"], help="which domain")
    parser.add_argument("--per-class", type=int, default=200, help="images per class of the full set (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    args = parser.parse_args(argv)
    print(probe_table(args.name, args.per_class, args.seed), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
