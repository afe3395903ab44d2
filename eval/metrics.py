"""Metrics of the evaluation harness: Fréchet distance, KID, prompt accuracy, clean-fid FID, CLIP score.

* Domain metrics (the honest ones at 8x8 and 32x32): :func:`fd_kid_from_images` -- Fréchet
  distance and KID on the features of the zoo's domain classifiers
  (:mod:`fastgen.eval.classifiers`) -- and :func:`prompt_accuracy`.
* :func:`clean_fid`: FID through clean-fid ("clean" mode, Inception) against an image folder, a
  clean-fid dataset statistic or a saved ``.npz``; it never downloads (clear error instead).
* :func:`clip_score`: CLIP score through open_clip.
* Building blocks: :func:`feature_stats`, :func:`frechet_distance`, :func:`fd_from_feats`,
  :func:`fd_via_cleanfid`, :func:`kid` (clean-fid's ``kernel_distance``), :func:`blur`.
* Input checks shared by all of them: :func:`check_images`, :func:`load_image_folder`.

Images are float tensors ``[N, C, H, W]`` in [0, 1] throughout (what the samplers return).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastgen.checks import check_choice
# Image-folder I/O lives with the pipelines (training reads image folders too); re-exported here.
from fastgen.pipelines.images import IMAGE_EXTENSIONS, list_image_files, load_image_folder, size_tuple

# Fewest images accepted for a Fréchet distance / KID. Two already give a covariance, but with
# fewer than ~10 images the estimate is noise (and KID needs subsets of at least 2 per side);
# the harness uses hundreds to thousands.
MIN_IMAGES_FD = 10
# The file clean-fid's "clean" / "legacy_tensorflow" modes load (cleanfid.inception_torchscript).
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"


# --- input checks -------------------------------------------------------------------------------
def check_images(images: torch.Tensor, expected_size: int | Sequence[int] | None = None,
                 expected_channels: int | None = None, min_images: int = 1, what: str = "images") -> torch.Tensor:
    """Check a batch of images and return it as a float tensor; raise a one-line ``ValueError`` otherwise.

    Args:
        images: ``[N, C, H, W]`` tensor with values in [0, 1].
        expected_size: required ``H = W`` (an int) or ``(H, W)``; ``None`` accepts any size.
        expected_channels: required ``C``; ``None`` accepts any channel count.
        min_images: fewest images accepted (use :data:`MIN_IMAGES_FD` before a Fréchet distance).
        what: name of the input in the error messages.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor [N, C, H, W] in [0, 1], got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(f"{what} must have shape [N, C, H, W], got {list(images.shape)}.")
    size = size_tuple(expected_size)
    if size is not None and tuple(images.shape[2:]) != size:
        raise ValueError(f"{what}: expected images of size {size[0]}x{size[1]}, got "
                         f"{images.shape[2]}x{images.shape[3]}.")
    if expected_channels is not None and images.shape[1] != expected_channels:
        raise ValueError(f"{what}: expected {expected_channels} channel(s), got {images.shape[1]}.")
    if len(images) < min_images:
        raise ValueError(f"{what}: {len(images)} image(s), at least {min_images} needed"
                         + (" for a Fréchet distance / KID." if min_images == MIN_IMAGES_FD else "."))
    images = images.float()
    if len(images):
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = " (they look like [-1, 1]: use (x + 1) / 2)" if lo < -0.5 else ""
            raise ValueError(f"{what}: values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]{hint}.")
    return images


def save_image_folder(images: torch.Tensor, folder: str | Path, prefix: str = "") -> Path:
    """Write ``[N, C, H, W]`` images in [0, 1] as 8-bit PNGs ``{prefix}{i:06d}.png`` (grey for C = 1).

    Args:
        images: the images (1 or 3 channels).
        folder: output folder (created).
        prefix: file name prefix.
    """
    from PIL import Image

    images = check_images(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {images.shape[1]}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, array in enumerate(arrays):
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / f"{prefix}{i:06d}.png")
    return folder


# --- Fréchet distance and KID on features -------------------------------------------------------
def _as_feats(feats, what: str) -> np.ndarray:
    feats = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"{what} must be a [N, D] feature array, got shape {list(feats.shape)}.")
    if len(feats) < 2:
        raise ValueError(f"{what}: {len(feats)} feature vector(s), at least 2 needed for a covariance.")
    return feats.astype(np.float64)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)``: mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``.

    Args:
        feats: numpy array or tensor ``[N, D]`` with ``N >= 2``.
    """
    feats = _as_feats(feats, "feats")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    Same computation as clean-fid's ``frechet_distance`` (scipy ``sqrtm``; if the product is
    singular, ``eps`` is added to both diagonals; a numerically imaginary part is dropped and a
    large one raises). Re-written here rather than called because clean-fid's version asserts on
    shape mismatches, prints to stdout and passes the argument scipy >= 1.16 deprecates
    (``disp``); :func:`fd_via_cleanfid` calls clean-fid itself and the tests check both agree.

    Args:
        mu1, sigma1: mean ``[D]`` and covariance ``[D, D]`` of the first feature set.
        mu2, sigma2: the same for the second (e.g. the reference) set.
        eps: diagonal offset used only when the covariance product is singular.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"Fréchet distance needs matching shapes, got mu {mu1.shape} / {mu2.shape} and sigma "
                         f"{sigma1.shape} / {sigma2.shape}.")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm "
                             "(covariances far from positive semi-definite).")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fd_from_feats(feats1, feats2) -> float:
    """Fréchet distance between two feature sets ``[N1, D]`` and ``[N2, D]`` (:func:`frechet_distance`).

    Args:
        feats1, feats2: numpy arrays or tensors of features, at least 2 rows each.
    """
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


def fd_via_cleanfid(feats1, feats2) -> float:
    """The same Fréchet distance computed by clean-fid itself (``cleanfid.fid.fid_from_feats``).

    Args:
        feats1, feats2: numpy arrays or tensors of features ``[N, D]``, at least 2 rows each.
    """
    from cleanfid.fid import fid_from_feats

    with warnings.catch_warnings():  # clean-fid passes sqrtm's deprecated ``disp`` argument
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(fid_from_feats(_as_feats(feats1, "feats1"), _as_feats(feats2, "feats2")))


def kid(feats1, feats2, num_subsets: int = 100, max_subset_size: int = 1000, seed: int | None = 0) -> float:
    """Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel) through clean-fid's ``kernel_distance``.

    Args:
        feats1, feats2: features ``[N1, D]`` and ``[N2, D]`` (numpy or tensors), at least 2 rows each.
        num_subsets: number of random subsets averaged.
        max_subset_size: subset size cap (the subset size is ``min(N1, N2, max_subset_size)``).
        seed: seed of the subset draws (clean-fid draws from numpy's global generator; it is
            seeded here and restored afterwards); ``None`` uses the global state as it is.
    """
    from cleanfid.fid import kernel_distance

    feats1, feats2 = _as_feats(feats1, "feats1"), _as_feats(feats2, "feats2")
    if feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"KID needs features of equal width, got {feats1.shape[1]} and {feats2.shape[1]}.")
    state = np.random.get_state()
    try:
        if seed is not None:
            np.random.seed(seed)
        return float(kernel_distance(feats1, feats2, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        if seed is not None:
            np.random.set_state(state)


def blur(images: torch.Tensor, kernel_size: int = 3, kind: str = "box", sigma: float | None = None) -> torch.Tensor:
    """Blurred copies of ``[N, C, H, W]`` images, for checking that a metric notices blur.

    Args:
        images: the images.
        kernel_size: odd kernel width.
        kind: ``"box"`` (mean over the window, edges averaged over the pixels inside the image:
            ``avg_pool2d`` with ``count_include_pad=False``) or ``"gaussian"`` (torchvision's
            ``gaussian_blur``, reflect padding).
        sigma: Gaussian standard deviation (default: torchvision's ``0.3 * ((k - 1) * 0.5 - 1) + 0.8``).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
    check_choice("kind", kind, ("box", "gaussian"))
    if kind == "box":
        return F.avg_pool2d(images, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(images, [kernel_size, kernel_size], None if sigma is None else [sigma, sigma])


# --- domain metrics (zoo classifiers) -----------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _shipped_classifier(name: str):
    from fastgen.eval.classifiers import load_classifier

    return load_classifier(name)


def _classifier(classifier):
    """``(model, name or None)`` for a classifier name, zoo teacher name or a DomainClassifier."""
    from fastgen.eval.classifiers import classifier_for

    if isinstance(classifier, str):
        name = classifier_for(classifier)
        return _shipped_classifier(name), name
    return classifier, None


def classifier_features(images: torch.Tensor, classifier, batch_size: int = 500) -> np.ndarray:
    """Domain-classifier features ``[N, D]`` (float64) of images ``[N, 1 or 3, S, S]`` in [0, 1].

    Args:
        images: the images (checked by :func:`check_images`).
        classifier: ``"digits"`` / ``"fmnist"``, a zoo teacher name, or a ``DomainClassifier``.
        batch_size: images per forward pass.
    """
    from fastgen.eval.classifiers import extract

    model, _ = _classifier(classifier)
    images = check_images(images, expected_size=model.config.image_size)
    return extract(model, images, "features", batch_size).double().numpy()


@functools.lru_cache(maxsize=4)
def _real_features(name: str, split: str) -> np.ndarray:
    from fastgen.eval.classifiers import real_images

    return classifier_features(real_images(name, split), name)


def reference_features(classifier_name: str, split: str = "test") -> np.ndarray:
    """Features ``[N, D]`` of the whole real ``split`` under the shipped classifier (cached per process).

    Args:
        classifier_name: ``"digits"`` / ``"fmnist"`` or a zoo teacher name.
        split: ``"train"`` or ``"test"``.
    """
    from fastgen.eval.classifiers import classifier_for

    return _real_features(classifier_for(classifier_name), split)


def fd_kid_from_images(images: torch.Tensor, classifier, reference: str | torch.Tensor = "test",
                       compute_kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
                       seed: int = 0, batch_size: int = 500) -> dict[str, float]:
    """Domain Fréchet distance and KID of generated images against real ones.

    Returns ``{"fd": ..., "kid": ... (absent if compute_kid is False), "n": N, "n_ref": N_ref}``.

    Args:
        images: generated images ``[N, 1, S, S]`` in [0, 1], ``N >= MIN_IMAGES_FD``.
        classifier: ``"digits"`` / ``"fmnist"``, a zoo teacher name (``"fmnist-ldm"``), or a
            ``DomainClassifier`` instance.
        reference: ``"test"`` (the real test split: the shipped ``reference_stats.npz`` for FD
            when ``classifier`` is a name), ``"train"`` (the real train split), or a tensor of
            real images in [0, 1]. The FD floor of a perfect generator is the real train-vs-test
            FD at the same ``N`` (see the classifier's README).
        compute_kid: also compute KID (needs the reference features, computed once per process).
        kid_subsets, kid_subset_size: :func:`kid`'s ``num_subsets`` and ``max_subset_size``.
        seed: seed of KID's subset draws.
        batch_size: images per classifier forward pass.
    """
    from fastgen.eval.classifiers import load_reference_stats

    model, name = _classifier(classifier)
    images = check_images(images, expected_size=model.config.image_size, min_images=MIN_IMAGES_FD,
                          what="generated images")
    feats = classifier_features(images, model, batch_size)
    if isinstance(reference, str):
        if reference not in ("test", "train"):
            raise ValueError(f"reference must be 'test', 'train' or a tensor of real images, not {reference!r}.")
        if name is None:  # a custom classifier: no shipped statistics, use its own features
            from fastgen.eval.classifiers import real_images

            ref_feats = classifier_features(real_images(model_domain(model), reference), model, batch_size)
        else:
            ref_feats = reference_features(name, reference) if compute_kid or reference == "train" else None
    else:
        reference = check_images(reference, expected_size=model.config.image_size, min_images=MIN_IMAGES_FD,
                                 what="reference images")
        ref_feats = classifier_features(reference, model, batch_size)
    if name is not None and isinstance(reference, str) and reference == "test":
        mu_ref, sigma_ref, n_ref = load_reference_stats(name)
    else:
        mu_ref, sigma_ref = feature_stats(ref_feats)
        n_ref = len(ref_feats)
    out = {"fd": frechet_distance(*feature_stats(feats), mu_ref, sigma_ref), "n": len(feats), "n_ref": n_ref}
    if compute_kid:
        out["kid"] = kid(feats, ref_feats, num_subsets=kid_subsets, max_subset_size=kid_subset_size, seed=seed)
    return out


def model_domain(model) -> str:
    """Classifier name (``"digits"`` / ``"fmnist"``) whose images match ``model``'s input size."""
    from fastgen.eval.classifiers import DEFAULTS

    for name, (arch, _) in DEFAULTS.items():
        if arch.image_size == model.config.image_size:
            return name
    raise ValueError(f"No zoo dataset has {model.config.image_size}x{model.config.image_size} images.")


def prompt_accuracy(images: torch.Tensor, labels, classifier, batch_size: int = 500) -> float:
    """Share of images the domain classifier assigns to their prompted class, in [0, 1].

    Args:
        images: generated images ``[N, 1, S, S]`` in [0, 1].
        labels: the prompted class of each image, ``N`` integers (for fmnist-ldm the index into
            ``fastgen.zoo.FMNIST_CLASSES``, i.e. the position of the prompt in ``zoo.prompts()``).
        classifier: ``"digits"`` / ``"fmnist"``, a zoo teacher name, or a ``DomainClassifier``.
        batch_size: images per forward pass.
    """
    from fastgen.eval.classifiers import extract

    model, _ = _classifier(classifier)
    images = check_images(images, expected_size=model.config.image_size, what="generated images")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(labels) != len(images):
        raise ValueError(f"prompt_accuracy: {len(images)} images but {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(f"prompt_accuracy: labels must be class indices 0..9, got {labels.min()}..{labels.max()}.")
    predictions = extract(model, images, "logits", batch_size).argmax(1)
    return float((predictions == labels).float().mean())


# --- FID through clean-fid (Inception) ----------------------------------------------------------
def inception_weights_path() -> Path:
    """Where clean-fid loads (and would download) its Inception weights.

    clean-fid 0.1.35 hard-codes the folder in ``cleanfid.features.feature_extractor``: ``/tmp``
    (``./`` on Windows), file ``inception-2015-12-05.pt``; it exposes no constant to import.
    """
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def check_inception_weights() -> Path:
    """The Inception weights file clean-fid needs; ``FileNotFoundError`` naming file, folder and URL if missing.

    clean-fid downloads the file silently when it is missing (and hangs or fails offline), so
    :func:`clean_fid` calls this first.
    """
    path = inception_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"clean-fid's Inception weights {path.name} are missing: put the file in {path.parent}/ "
            f"(download it from {INCEPTION_URL}); fastgen does not download it (offline machines).")
    return path


def _cleanfid_stats_file(dataset_name: str, dataset_res, dataset_split: str, mode: str) -> Path:
    import cleanfid

    # File name as built by cleanfid.features.get_reference_statistics (FID, Inception).
    res = "na" if dataset_split == "custom" else dataset_res
    return Path(cleanfid.__file__).parent / "stats" / f"{dataset_name}_{mode}_{dataset_split}_{res}.npz".lower()


def _check_reference(reference, dataset_res, dataset_split, mode, custom: bool):
    """Validate ``reference`` of :func:`clean_fid`: returns ``("folder" | "stats" | "dataset" | "images", value)``."""
    if isinstance(reference, torch.Tensor):
        return "images", check_images(reference, min_images=MIN_IMAGES_FD, what="reference images")
    ref = Path(reference)
    if ref.is_dir():
        list_image_files(ref, min_images=MIN_IMAGES_FD)
        return "folder", ref
    if ref.suffix == ".npz":
        if not ref.is_file():
            raise ValueError(f"Reference statistics file {ref} does not exist.")
        with np.load(ref) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ValueError(f"Reference statistics {ref} must hold arrays 'mu' and 'sigma', has {list(stats)}.")
        return "stats", ref
    if os.sep in str(reference) or ref.exists():
        raise ValueError(f"Reference {reference} is neither an image folder nor a .npz statistics file.")
    if custom:
        raise ValueError("A clean-fid dataset name holds Inception statistics; with a custom feature extractor "
                         "pass a reference image folder or .npz of that extractor's features instead.")
    if dataset_res is None and dataset_split != "custom":
        raise ValueError(f"Reference {reference!r} is taken as a clean-fid dataset name, which needs its resolution "
                         f"(and split): --fid-reference {reference}:RES[:SPLIT], e.g. cifar10:32:train (Python: "
                         "dataset_res=, dataset_split=); or give a folder of real images or a .npz statistics file.")
    stats_file = _cleanfid_stats_file(str(reference), dataset_res, dataset_split, mode)
    if not stats_file.is_file() and dataset_split == "custom":
        raise FileNotFoundError(
            f"clean-fid custom statistics {stats_file.name} for {reference!r} are missing: make them with "
            f"cleanfid.fid.make_custom_stats({str(reference)!r}, IMAGE_FOLDER) (they go to {stats_file.parent}/), or "
            "give the image folder itself as --fid-reference.")
    if not stats_file.is_file():
        raise FileNotFoundError(
            f"clean-fid statistics {stats_file.name} for dataset {reference!r} are missing: put the file in "
            f"{stats_file.parent}/ (download it from {CLEANFID_STATS_URL}{stats_file.name}); fastgen does not download.")
    return "dataset", str(reference)


def parse_fid_reference(text: str) -> tuple[str, int | None, str]:
    """``--fid-reference`` as ``(reference, dataset_res, dataset_split)``: a folder or ``.npz`` file as it is, a
    clean-fid dataset name as ``NAME:RES[:SPLIT]`` (``cifar10:32`` -> ``("cifar10", 32, "train")``), clean-fid's
    custom statistics (``cleanfid.fid.make_custom_stats(NAME, folder)``) as ``NAME:custom``."""
    name, _, rest = str(text).partition(":")
    if not rest or Path(text).exists() or os.sep in name:
        return str(text), None, "train"
    if rest == "custom":
        return name, None, "custom"
    res, _, split = rest.partition(":")
    if not res.isdigit() or split not in ("", "train", "test", "custom"):
        raise ValueError(f"--fid-reference {text!r}: a clean-fid dataset is NAME:RES[:SPLIT] with a whole-number "
                         "resolution and a split train, test or custom (e.g. cifar10:32:train).")
    return name, int(res), split or "train"


def check_fid(reference, dataset_res: int | None = None, dataset_split: str = "train", mode: str = "clean") -> None:
    """Everything :func:`clean_fid` needs besides the images -- the Inception weights and the reference -- as
    one-line errors, for callers that must fail before generating."""
    _check_reference(reference, dataset_res, dataset_split, mode, custom=False)
    check_inception_weights()


def _cleanfid_features(folder: Path, feat_model, mode: str, batch_size: int, device, verbose: bool) -> np.ndarray:
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(folder), feat_model, num_workers=0, batch_size=batch_size, device=device,
                               mode=mode, verbose=verbose, description=f"clean-fid {folder.name}: ")


def _device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def clean_fid(images_or_folder, reference, dataset_res: int | None = None, dataset_split: str = "train",
              mode: str = "clean", custom_feat_extractor=None, batch_size: int = 32, device=None,
              verbose: bool = False) -> float:
    """FID through clean-fid: Inception features (``"clean"`` mode: PIL bicubic resize to 299) and clean-fid's Fréchet distance.

    Checks the Inception weights first and raises ``FileNotFoundError`` naming the file and the
    folder to put it in when missing (clean-fid would try to download them). Inception features
    are meaningless on the zoo's 8x8 / 32x32 grey images; use :func:`fd_kid_from_images` there.

    Args:
        images_or_folder: generated images (``[N, 1 or 3, H, W]`` tensor in [0, 1], written as PNGs
            to a temporary folder) or a folder of image files; at least ``MIN_IMAGES_FD`` images.
        reference: an image folder, a tensor of real images, a ``.npz`` file with ``mu`` and
            ``sigma`` (clean-fid's format, e.g. from :func:`clean_fid_stats`), or a clean-fid
            dataset name (``"cifar10"``, ``"ffhq"``, ...) whose statistics file is already in
            clean-fid's ``stats`` folder (it is never downloaded here).
        dataset_res: resolution of the clean-fid dataset statistics (only with a dataset name).
        dataset_split: split of the clean-fid dataset statistics (``"train"``, ``"test"``, ``"custom"``).
        mode: clean-fid mode, ``"clean"`` (default) or ``"legacy_tensorflow"`` / ``"legacy_pytorch"``.
        custom_feat_extractor: optional feature function ``[B, 3, 299, 299]`` in [0, 255] -> ``[B, D]``
            replacing Inception (clean-fid's ``custom_feat_extractor``; then no weights are needed).
        batch_size: images per feature batch.
        device: torch device; default CUDA when available, else CPU.
        verbose: clean-fid's progress output.
    """
    from cleanfid.features import build_feature_extractor, get_reference_statistics
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    if isinstance(images_or_folder, torch.Tensor):
        check_images(images_or_folder, min_images=MIN_IMAGES_FD, what="generated images")
    else:
        list_image_files(images_or_folder, min_images=MIN_IMAGES_FD)
    kind, ref = _check_reference(reference, dataset_res, dataset_split, mode, custom_feat_extractor is not None)
    device = _device(device)
    if custom_feat_extractor is None:
        if mode == "legacy_pytorch":
            raise ValueError("mode 'legacy_pytorch' loads torchvision-style Inception weights that clean-fid downloads "
                             "separately; use mode='clean' (or 'legacy_tensorflow').")
        check_inception_weights()
        feat_model = build_feature_extractor(mode, device, use_dataparallel=False)
    else:
        feat_model = custom_feat_extractor

    with tempfile.TemporaryDirectory(prefix="fastgen-cleanfid-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes sqrtm's deprecated ``disp``
        folder = images_or_folder
        if isinstance(images_or_folder, torch.Tensor):
            folder = save_image_folder(images_or_folder, Path(tmp) / "generated")
        feats = _cleanfid_features(Path(folder), feat_model, mode, batch_size, device, verbose)
        if kind in ("folder", "images"):
            ref_folder = ref if kind == "folder" else save_image_folder(ref, Path(tmp) / "reference")
            ref_feats = _cleanfid_features(Path(ref_folder), feat_model, mode, batch_size, device, verbose)
            mu_ref, sigma_ref = np.mean(ref_feats, axis=0), np.cov(ref_feats, rowvar=False)
        elif kind == "stats":
            with np.load(ref) as stats:
                mu_ref, sigma_ref = stats["mu"], stats["sigma"]
        else:
            mu_ref, sigma_ref = get_reference_statistics(ref, dataset_res, mode=mode, split=dataset_split)
        mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
        if mu.shape != np.shape(mu_ref):
            raise ValueError(f"Feature width {mu.shape[0]} does not match the reference statistics' {np.shape(mu_ref)[0]}.")
        return float(cleanfid_frechet_distance(mu, sigma, mu_ref, sigma_ref))


def clean_fid_stats(images_or_folder, path: str | Path, mode: str = "clean", custom_feat_extractor=None,
                    batch_size: int = 32, device=None, verbose: bool = False) -> Path:
    """Save clean-fid feature statistics (``mu``, ``sigma``, ``n``) of real images as a ``.npz`` reference for :func:`clean_fid`.

    Args:
        images_or_folder: real images (``[N, C, H, W]`` tensor in [0, 1]) or an image folder.
        path: output ``.npz`` file.
        mode, custom_feat_extractor, batch_size, device, verbose: as in :func:`clean_fid`.
    """
    from cleanfid.features import build_feature_extractor

    if isinstance(images_or_folder, torch.Tensor):
        check_images(images_or_folder, min_images=MIN_IMAGES_FD)
    else:
        list_image_files(images_or_folder, min_images=MIN_IMAGES_FD)
    device = _device(device)
    if custom_feat_extractor is None:
        check_inception_weights()
        feat_model = build_feature_extractor(mode, device, use_dataparallel=False)
    else:
        feat_model = custom_feat_extractor
    with tempfile.TemporaryDirectory(prefix="fastgen-cleanfid-") as tmp:
        folder = images_or_folder
        if isinstance(images_or_folder, torch.Tensor):
            folder = save_image_folder(images_or_folder, Path(tmp) / "images")
        feats = _cleanfid_features(Path(folder), feat_model, mode, batch_size, device, verbose)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=np.mean(feats, axis=0), sigma=np.cov(feats, rowvar=False), n=np.int64(len(feats)))
    return path


# --- CLIP score (open_clip) -----------------------------------------------------------------------
def load_clip(clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai", device=None):
    """``(model, preprocess, tokenizer)`` from open_clip, in eval mode.

    Raises ``ValueError`` for an unknown model name or pretrained tag and ``RuntimeError`` when
    the weights cannot be obtained (open_clip downloads them on first use; offline, with
    ``HF_HUB_OFFLINE=1``, that fails at once).

    Args:
        clip_model: open_clip architecture name (``open_clip.list_models()``), or an
            ``hf-hub:`` / ``local-dir:`` identifier.
        clip_pretrained: pretrained tag (``open_clip.list_pretrained_tags_by_model(clip_model)``), a
            checkpoint file, or ``None`` for random weights (tests).
        device: torch device; default CUDA when available, else CPU.
    """
    import open_clip

    device = _device(device)
    has_schema = clip_model.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and clip_model not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model {clip_model!r}; see open_clip.list_models().")
    if (clip_pretrained and not has_schema and not Path(clip_pretrained).is_file()
            and clip_pretrained not in open_clip.list_pretrained_tags_by_model(clip_model)):
        raise ValueError(f"open_clip has no pretrained tag {clip_pretrained!r} for {clip_model!r}; available: "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(clip_model)) or 'none'}.")
    logging.disable(logging.ERROR)  # open_clip logs a failed download as an ERROR line; the error below says it once
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(clip_model, pretrained=clip_pretrained,
                                                                     device=device)
        tokenizer = open_clip.get_tokenizer(clip_model)
    except Exception as e:  # open_clip raises RuntimeError (and others) when a download fails
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise RuntimeError(f"open_clip weights for model {clip_model!r} with pretrained={clip_pretrained!r} are not "
                           f"available{offline}: they are downloaded on first use and cannot be fetched offline; "
                           f"run once with network access or pass a checkpoint file. ({type(e).__name__}: {e})") from e
    finally:
        logging.disable(logging.NOTSET)
    return model.eval(), preprocess, tokenizer


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_model: str = "ViT-B-32",
               clip_pretrained: str | None = "openai", model=None, preprocess=None, tokenizer=None,
               batch_size: int = 64, device=None) -> float:
    """CLIP score: mean over image-prompt pairs of ``100 * max(cos(image embedding, text embedding), 0)``.

    This is the definition of torchmetrics' ``CLIPScore`` (Hessel et al. 2021 with weight 100
    instead of 2.5); it lies in [0, 100]. Each image is scored against its own prompt.

    Args:
        images: ``[N, 1 or 3, H, W]`` in [0, 1] (grey is repeated to RGB; open_clip's preprocess
            resizes to the model's input size).
        prompts: ``N`` prompts, one per image.
        clip_model, clip_pretrained: which open_clip model to load (see :func:`load_clip`);
            ignored when ``model`` is given.
        model, preprocess, tokenizer: an already-built open_clip model, its image transform (PIL
            -> tensor) and its tokenizer (e.g. a tiny untrained config in tests); give all three.
        batch_size: pairs per forward pass.
        device: torch device; default the given model's device, else CUDA when available, else CPU.
    """
    from torchvision.transforms.functional import to_pil_image

    images = check_images(images, what="images")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {images.shape[1]}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts.")
    if not len(images):
        raise ValueError("clip_score: no images.")
    if model is None:
        model, preprocess, tokenizer = load_clip(clip_model, clip_pretrained, device)
    elif preprocess is None or tokenizer is None:
        raise ValueError("clip_score: with model=..., also pass its preprocess and tokenizer.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    scores = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size].cpu()
        if batch.shape[1] == 1:
            batch = batch.repeat(1, 3, 1, 1)
        pixels = torch.stack([preprocess(to_pil_image(img)) for img in batch]).to(device)
        tokens = tokenizer(prompts[i:i + batch_size]).to(device)
        image_emb = F.normalize(model.encode_image(pixels).float(), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        scores.append(100 * (image_emb * text_emb).sum(-1).clamp(min=0))
    return float(torch.cat(scores).mean())
