"""Metrics that see diversity, beside the domain FD of :mod:`fastgen.eval.metrics`.

A Fréchet distance folds fidelity and diversity into one number, and on the zoo's classifier
features it can rank a mode-seeking sampler (high guidance, a distilled student) level with or
above a diverse one (see ``docs/evaluation.md``). These metrics separate the two:

* :func:`prdc` -- precision and recall (Kynkäänniemi et al. 2019) and density and coverage
  (Naeem et al. 2020) through the authors' reference implementation ``prdc.compute_prdc``, on
  the domain classifier's features (:func:`prdc_from_images`). Precision and density: how much
  of the generated set lies on the real data's manifold (fidelity); recall and coverage: how
  much of the real manifold the generated set reaches (diversity).
* :func:`class_fd` -- per-class FD: the mean over classes of the FD between the generated images
  of class c (the prompted class) and the real test images of class c
  (:func:`class_fd_from_images`). A sampler that draws every class but only a few modes of each
  cannot hide behind the spread *between* classes.
* :func:`pixel_fd_from_images` -- FD on features that are not a classifier's: the projection of
  the pixels on the leading principal components of the real train split
  (:data:`PIXEL_PCA_COMPONENTS`).
* :func:`fd_groups_from_images` -- the FD of each feature group of the classifier alone (also
  the groups the headline FD leaves out): the diagnostic of which layer rewards what.

Images are float tensors ``[N, C, H, W]`` in [0, 1]; labels are class indices.
"""

from __future__ import annotations

import contextlib
import functools
import io

import numpy as np
import torch

from .metrics import MIN_IMAGES_FD, _as_feats, _classifier, check_images, classifier_features, fd_from_feats, \
    feature_stats, frechet_distance, reference_features

# k of the k-nearest-neighbour balls of precision / recall / density / coverage: Naeem et al.'s
# recommended k = 5 (with 10,000 images per side), one k for all four so that they share their balls.
PRDC_K = 5
PRDC_KEYS = ("precision", "recall", "density", "coverage")
# Principal components of the pixel FD. fmnist (32x32 = 1,024 pixels): 64 components hold 88% of
# the train split's pixel variance. digits (8x8 = 64 pixels): 20 components hold 89% of it (the same
# share), leave out 4 pixels that are 0 in every train image (a singular covariance otherwise), and
# keep 15 test images per dimension for the covariance (the digits test split has only 300 images).
PIXEL_PCA_COMPONENTS = {"digits": 20, "fmnist": 64}


# --- precision, recall, density, coverage -------------------------------------------------------
def prdc(real_feats, fake_feats, k: int = PRDC_K) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake_feats`` against ``real_feats`` (``prdc.compute_prdc``).

    The k-nearest-neighbour estimates are biased by the sample sizes (a larger set has smaller
    balls), so pass sets of equal size, as :func:`prdc_from_images` does. Precision, recall and
    coverage lie in [0, 1]; density is around 1 for matching distributions and may exceed 1.

    Args:
        real_feats: real features ``[N_real, D]`` (numpy or tensor).
        fake_feats: generated features ``[N_fake, D]``.
        k: the neighbour whose distance is each ball's radius (:data:`PRDC_K`).
    """
    from prdc import compute_prdc

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    real, fake = _as_feats(real_feats, "real_feats"), _as_feats(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"prdc needs features of equal width, got real_feats {real.shape[1]} and fake_feats "
                         f"{fake.shape[1]}.")
    for what, feats in (("real_feats", real), ("fake_feats", fake)):
        if len(feats) <= k:
            raise ValueError(f"{what}: {len(feats)} feature vectors, more than k = {k} needed.")
    # compute_prdc prints the set sizes on every call; keep the harness's stdout for its tables
    with contextlib.redirect_stdout(io.StringIO()):
        out = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {key: float(out[key]) for key in PRDC_KEYS}


def _subset(n_total: int, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` of ``n_total`` items: all in order when ``n == n_total``, else a seeded draw."""
    if n == n_total:
        return np.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].numpy()



def _named_classifier(classifier, images: torch.Tensor, caller: str, min_images: int = 1):
    """``(model, name, images)``: the shipped classifier named by ``classifier`` (a model instance is refused:
    these metrics compare against its stored real-data features) and ``images`` checked for its input size."""
    model, name = _classifier(classifier)
    if name is None:
        raise ValueError(f"{caller} needs a classifier name ('digits', 'fmnist' or a zoo teacher), "
                         "not a model instance.")
    images = check_images(images, expected_size=model.config.image_size, min_images=min_images,
                          what="generated images")
    return model, name, images

def prdc_from_images(images: torch.Tensor, classifier, k: int = PRDC_K, seed: int = 0,
                     batch_size: int = 500) -> dict[str, float]:
    """Precision, recall, density and coverage of generated images on the domain classifier's features.

    The real side is a subset of the real test split of the same size as the generated set
    (drawn with ``seed``); when the split is smaller (digits: 300 images), the same number of
    generated images is drawn instead. Returns ``{"precision", "recall", "density", "coverage",
    "n_prdc"}`` (``n_prdc``: images per side).

    Args:
        images: generated images ``[N, 1, S, S]`` in [0, 1], ``N >= MIN_IMAGES_FD``.
        classifier: ``"digits"`` / ``"fmnist"`` or a zoo teacher name (the shipped classifier).
        k: see :func:`prdc`.
        seed: seed of the subset draws.
        batch_size: images per classifier forward pass.
    """
    model, name, images = _named_classifier(classifier, images, "prdc_from_images", MIN_IMAGES_FD)
    real = reference_features(name, "test")
    n = min(len(images), len(real))
    fake = classifier_features(images[torch.from_numpy(_subset(len(images), n, seed))], model, batch_size)
    return {**prdc(real[_subset(len(real), n, seed)], fake, k), "n_prdc": n}


# --- per-class FD -------------------------------------------------------------------------------
def _as_labels(labels, n: int, what: str) -> np.ndarray:
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{what} must be {n} class indices (one per image), got shape {list(labels.shape)}.")
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ValueError(f"{what} must be non-negative integer class indices, got dtype {labels.dtype} "
                         f"with values {labels.min()}..{labels.max()}.")
    return labels


def class_fd(feats, labels, ref_feats, ref_labels) -> dict:
    """Per-class Fréchet distance: the mean over the classes c in ``labels`` of FD(feats of c, ref_feats of c).

    Returns ``{"fd_class": mean, "fd_by_class": {c: FD of class c}}``.

    Args:
        feats: generated features ``[N, D]``.
        labels: the class of each generated image (the prompted class), ``N`` integers; every class
            present needs at least ``MIN_IMAGES_FD`` images.
        ref_feats: real features ``[M, D]``.
        ref_labels: the class of each real image, ``M`` integers; every class of ``labels`` needs
            at least ``MIN_IMAGES_FD`` real images.
    """
    feats, ref_feats = _as_feats(feats, "feats"), _as_feats(ref_feats, "ref_feats")
    labels, ref_labels = _as_labels(labels, len(feats), "labels"), _as_labels(ref_labels, len(ref_feats), "ref_labels")
    if feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(f"class_fd needs features of equal width, got feats {feats.shape[1]} and ref_feats "
                         f"{ref_feats.shape[1]}.")
    classes = np.unique(labels)
    for c in classes:
        for what, lab in (("labels", labels), ("ref_labels", ref_labels)):
            count = int((lab == c).sum())
            if count < MIN_IMAGES_FD:
                raise ValueError(f"{what}: class {c} has {count} image(s), at least {MIN_IMAGES_FD} per class needed "
                                 f"for a per-class Fréchet distance.")
    per_class = {int(c): fd_from_feats(feats[labels == c], ref_feats[ref_labels == c]) for c in classes}
    return {"fd_class": float(np.mean(list(per_class.values()))), "fd_by_class": per_class}


@functools.lru_cache(maxsize=4)
def _real_labels(name: str, split: str) -> np.ndarray:
    from .classifiers import real_images

    return real_images(name, split, with_labels=True)[1].numpy()


def class_fd_from_images(images: torch.Tensor, labels, classifier, batch_size: int = 500) -> dict:
    """Per-class FD (:func:`class_fd`) of generated images against the real test split (domain classifier features).

    The real-data floor is the same computation on real train images with the same number of
    images per class (``fastgen.eval.evaluate.real_floor``): at 100 images per class it is far
    above the all-class floor, because each class's covariance is estimated from few images.

    Args:
        images: generated images ``[N, 1, S, S]`` in [0, 1].
        labels: the prompted class of each image, ``N`` integers in 0..9, at least
            ``MIN_IMAGES_FD`` images per class present.
        classifier: ``"digits"`` / ``"fmnist"`` or a zoo teacher name (the shipped classifier).
        batch_size: images per classifier forward pass.
    """
    model, name, images = _named_classifier(classifier, images, "class_fd_from_images")
    labels = _as_labels(labels, len(images), "labels")
    if len(labels) and labels.max() >= 10:
        raise ValueError(f"labels must be class indices 0..9, got {labels.min()}..{labels.max()}.")
    return class_fd(classifier_features(images, model, batch_size), labels, reference_features(name, "test"),
                    _real_labels(name, "test"))


# --- pixel-PCA FD -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def pixel_pca(name: str):
    """sklearn ``PCA`` with :data:`PIXEL_PCA_COMPONENTS` components fitted on the real train split's pixels (cached).

    Args:
        name: ``"digits"`` / ``"fmnist"`` or a zoo teacher name.
    """
    from sklearn.decomposition import PCA

    from .classifiers import classifier_for, real_images

    name = classifier_for(name)
    pixels = real_images(name, "train").flatten(1).double().numpy()
    # "covariance_eigh": exact, and one pass over the 60,000 x 1,024 fmnist pixels (a full SVD takes ~6x longer)
    return PCA(n_components=PIXEL_PCA_COMPONENTS[name], svd_solver="covariance_eigh").fit(pixels)


def pixel_features(images: torch.Tensor, name: str) -> np.ndarray:
    """Coordinates ``[N, components]`` of images on the leading principal components of the real train pixels.

    Args:
        images: ``[N, 1 or 3, S, S]`` in [0, 1] (3 channels are averaged to grey, as the classifiers do).
        name: ``"digits"`` / ``"fmnist"`` or a zoo teacher name.
    """
    from .classifiers import DEFAULTS, classifier_for

    name = classifier_for(name)
    size = DEFAULTS[name][0].image_size
    images = check_images(images, expected_size=size, what="images")
    if images.shape[1] == 3:
        images = images.mean(dim=1, keepdim=True)
    elif images.shape[1] != 1:
        raise ValueError(f"images: expected 1 or 3 channels, got {images.shape[1]}.")
    return pixel_pca(name).transform(images.flatten(1).double().cpu().numpy())


@functools.lru_cache(maxsize=2)
def _pixel_test_stats(name: str) -> tuple[np.ndarray, np.ndarray]:
    from .classifiers import real_images

    return feature_stats(pixel_features(real_images(name, "test"), name))


def pixel_fd_from_images(images: torch.Tensor, name: str) -> float:
    """Pixel-PCA FD: Fréchet distance of :func:`pixel_features` between generated images and the real test split.

    The real-data floor is the same distance for real train images at the same N.

    Args:
        images: generated images ``[N, 1 or 3, S, S]`` in [0, 1], ``N >= MIN_IMAGES_FD``.
        name: ``"digits"`` / ``"fmnist"`` or a zoo teacher name.
    """
    from .classifiers import classifier_for

    name = classifier_for(name)
    images = check_images(images, min_images=MIN_IMAGES_FD, what="generated images")
    return frechet_distance(*feature_stats(pixel_features(images, name)), *_pixel_test_stats(name))


# --- diagnostics --------------------------------------------------------------------------------
def fd_by_feature_group(feats, ref_feats, groups) -> dict[str, float]:
    """The Fréchet distance of each feature group alone: ``{group name: FD on its columns}``.

    Args:
        feats: generated features ``[N, D]``.
        ref_feats: real features ``[M, D]``.
        groups: ``(name, width)`` of consecutive column groups covering ``D``
            (``DomainClassifier.feature_groups()``).
    """
    feats, ref_feats = _as_feats(feats, "feats"), _as_feats(ref_feats, "ref_feats")
    widths = [w for _, w in groups]
    if feats.shape[1] != ref_feats.shape[1] or sum(widths) != feats.shape[1]:
        raise ValueError(f"groups cover {sum(widths)} columns; feats have {feats.shape[1]} and ref_feats "
                         f"{ref_feats.shape[1]}.")
    out, start = {}, 0
    for group, width in groups:
        out[group] = fd_from_feats(feats[:, start:start + width], ref_feats[:, start:start + width])
        start += width
    return out


@functools.lru_cache(maxsize=2)
def _all_test_features(name: str) -> np.ndarray:
    from .classifiers import extract, real_images

    model, _ = _classifier(name)
    return extract(model, real_images(name, "test"), "all_features").double().numpy()


def fd_groups_from_images(images: torch.Tensor, classifier, batch_size: int = 500) -> dict[str, float]:
    """The FD of each of the classifier's feature groups alone, generated images against the real test split.

    Returns ``{group name: FD}`` for every group of ``DomainClassifier.feature_groups()``, including
    those the headline FD leaves out (``FD_GROUPS``), and ``{"all": FD}`` on all groups together
    (the headline FD's features before the penultimate layer alone replaced them).

    Args:
        images: generated images ``[N, 1, S, S]`` in [0, 1], ``N >= MIN_IMAGES_FD``.
        classifier: ``"digits"`` / ``"fmnist"`` or a zoo teacher name (the shipped classifier).
        batch_size: images per classifier forward pass.
    """
    from .classifiers import extract

    model, name, images = _named_classifier(classifier, images, "fd_groups_from_images", MIN_IMAGES_FD)
    feats, ref_feats = extract(model, images, "all_features", batch_size).double().numpy(), _all_test_features(name)
    return {**fd_by_feature_group(feats, ref_feats, model.feature_groups()), "all": fd_from_feats(feats, ref_feats)}
