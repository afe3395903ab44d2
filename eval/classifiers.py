"""Domain classifiers of the zoo: the feature extractor of the honest metrics at 8x8 and 32x32.

Inception (FID) is meaningless on 8x8 digits and 28x28 Fashion-MNIST, so each zoo dataset has a
small CNN trained on its real train split. Its *features* give the domain Fréchet distance (FD)
and KID (:mod:`fastgen.eval.metrics`), its *predictions* give prompt accuracy (the share of
generated images classified as the prompted class).

Five feature groups are computed (:meth:`DomainClassifier.feature_groups`): the spatial mean and
standard deviation of an early block (full resolution, edge-like filters) and of a middle block,
and the penultimate layer; each is centred and scaled to unit mean variance on the real train
split (buffers stored with the weights). The FD, KID, per-class FD and precision / recall use the
groups of :data:`FD_GROUPS` -- the penultimate layer only. The four block statistics measure local
contrast and texture: on the zoo teachers' samples they are dominated by a texture bias that
classifier-free guidance offsets by raising contrast, so an FD that included them fell as
guidance rose even while diversity fell (docs/evaluation.md). The penultimate layer alone still
puts blur and noise far above the real-data floor (the distortion table in each README); the
block statistics remain available per group (``fastgen eval --metrics fd_groups``).

Shipped weights live in ``fastgen/zoo/classifiers/<name>/`` (``model.safetensors``,
``config.json``, ``reference_stats.npz`` = FD-feature mean / covariance on the real test split,
``README.md``). ``python -m fastgen.eval.classifiers NAME`` retrains one from its fixed seed;
``--reference-only`` rewrites the reference statistics, the distortion table and the README from
the shipped weights (after a change of :data:`FD_GROUPS`, no retraining needed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastgen.checks import check_choice
from fastgen.pipelines.folders import installed_output, keep_other_files, writing_folder
from fastgen.zoo import USER_DIR, ZOO_DIR

CLASSIFIER_DIR = ZOO_DIR / "classifiers"
NAMES = ("digits", "fmnist")
# Zoo teacher -> the classifier of its domain.
TEACHER_CLASSIFIER = {"digits-ddpm": "digits", "fmnist-ldm": "fmnist", "fmnist-flow": "fmnist"}
NUM_CLASSES = 10
# The feature groups of the FD features (:meth:`DomainClassifier.features`), see the module docstring.
FD_GROUPS = ("penultimate",)


@dataclass
class ClassifierConfig:
    """Architecture of a :class:`DomainClassifier` (stored in ``config.json``).

    Args:
        image_size: height = width of the (1-channel) input images.
        channels: output channels of the three conv blocks; a 2x max-pool follows blocks 1 and 2.
        hidden: width of the penultimate (fully connected) layer.
        head_pool: block 3 is average-pooled to ``head_pool x head_pool`` before the head.
        dropout: dropout before the last layer (training only).
    """

    image_size: int = 32
    channels: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    head_pool: int = 4
    dropout: float = 0.3


@dataclass
class TrainConfig:
    """Training hyper-parameters of one classifier (stored in ``config.json``).

    Args:
        epochs: passes over the train split.
        batch_size: images per optimiser step.
        lr: peak Adam learning rate (cosine decay to 0 after one linear warm-up epoch).
        weight_decay: decoupled weight decay of AdamW.
        max_shift: random shifts of up to this many pixels in x and y (background fill).
        hflip: random horizontal flips (class-preserving for Fashion-MNIST, not for digits).
    """

    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 2
    hflip: bool = True


DEFAULTS = {
    "digits": (ClassifierConfig(image_size=8, channels=(16, 32, 64), hidden=64, head_pool=2),
               TrainConfig(epochs=60, batch_size=64, lr=3e-3, max_shift=1, hflip=False)),
    "fmnist": (ClassifierConfig(image_size=32, channels=(16, 32, 64), hidden=128, head_pool=4),
               TrainConfig(epochs=6, batch_size=128, lr=3e-3, max_shift=2, hflip=True)),
}


def _check_name(name: str) -> str:
    if name not in DEFAULTS:
        raise KeyError(f"Unknown classifier {name!r}; available: {', '.join(NAMES)} "
                       f"(zoo teachers map to them as {TEACHER_CLASSIFIER}).")
    return name


def classifier_for(name: str) -> str:
    """Classifier name for a zoo teacher name (``"fmnist-ldm"`` -> ``"fmnist"``); classifier names pass through.

    Args:
        name: a zoo teacher name (see ``TEACHER_CLASSIFIER``) or a classifier name (``NAMES``).
    """
    return _check_name(TEACHER_CLASSIFIER.get(name, name))


def train_command(name: str) -> str:
    """The shell command that (re)trains classifier ``name`` into its installed folder."""
    return f"python -m fastgen.eval.classifiers {name}"


class DomainClassifier(nn.Module):
    """Small CNN on 1-channel images in [0, 1]: 10-class logits and a multi-layer feature vector.

    Args:
        config: the architecture (:class:`ClassifierConfig`); a dict with its fields also works.
    """

    def __init__(self, config: ClassifierConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = ClassifierConfig(**{**config, "channels": tuple(config["channels"])})
        self.config = config
        c1, c2, c3 = config.channels

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.block1 = block(1, c1)
        self.block2 = block(c1, c2)
        self.block3 = block(c2, c3)
        self.fc = nn.Linear(c3 * config.head_pool ** 2, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.hidden, NUM_CLASSES)
        # Affine map of the raw feature vector (all groups), set by :meth:`calibrate_features` (identity until then).
        self.register_buffer("feature_shift", torch.zeros(self.all_feature_dim))
        self.register_buffer("feature_scale", torch.ones(self.all_feature_dim))

    @property
    def all_feature_dim(self) -> int:
        """Length of the vector :meth:`all_features` returns per image (every group)."""
        return sum(width for _, width in self.feature_groups())

    @property
    def feature_dim(self) -> int:
        """Length of the vector :meth:`features` returns per image (the groups of ``FD_GROUPS``)."""
        return sum(width for name, width in self.feature_groups() if name in FD_GROUPS)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` (``[N, C, H, W]`` in [0, 1]) and return it as float ``[N, 1, H, W]`` on the model's device.

        3-channel images are converted to grey by averaging the channels; any other channel
        count, or a spatial size other than ``config.image_size``, raises ``ValueError``.
        """
        size = self.config.image_size
        expected = f"[N, 1, {size}, {size}] (or 3 channels)"
        if x.ndim != 4:
            raise ValueError(f"DomainClassifier expects images {expected}, got shape {list(x.shape)}.")
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] != 1:
            raise ValueError(f"DomainClassifier expects images {expected}, got {x.shape[1]} channels "
                             f"(shape {list(x.shape)}).")
        if tuple(x.shape[2:]) != (size, size):
            raise ValueError(f"DomainClassifier expects images {expected}, got spatial size "
                             f"{x.shape[2]}x{x.shape[3]} (shape {list(x.shape)}).")
        return x.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)

    def _trunk(self, x: torch.Tensor):
        x = self.prepare(x)
        h1 = self.block1(x)
        h2 = self.block2(F.max_pool2d(h1, 2))
        h3 = self.block3(F.max_pool2d(h2, 2))
        pooled = F.adaptive_avg_pool2d(h3, self.config.head_pool).flatten(1)
        return h1, h2, self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, 10]`` of images ``x`` (``[N, 1 or 3, S, S]`` in [0, 1])."""
        _, _, hidden = self._trunk(x)
        return self.out(self.dropout(F.relu(hidden)))

    def feature_groups(self) -> list[tuple[str, int]]:
        """``(name, width)`` of the parts of the feature vector, in order."""
        c1, c2, _ = self.config.channels
        return [("block1_mean", c1), ("block1_std", c1), ("block2_mean", c2), ("block2_std", c2),
                ("penultimate", self.config.hidden)]

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated features ``[N, feature_dim]``: the groups of :meth:`feature_groups` concatenated.

        Spatial mean and std of block 1 (full resolution) and block 2 (half resolution), after
        their ReLU, and the penultimate layer before its ReLU (no dead units).
        """
        h1, h2, hidden = self._trunk(x)
        parts = [h1.mean(dim=(2, 3)), h1.std(dim=(2, 3), unbiased=False),
                 h2.mean(dim=(2, 3)), h2.std(dim=(2, 3), unbiased=False), hidden]
        return torch.cat(parts, dim=1)

    def all_features(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated features of every group ``[N, all_feature_dim]`` (the per-group diagnostics).

        ``(raw_features(x) - feature_shift) * feature_scale``: centred on the real train split and
        each group scaled to unit mean variance there (raw early-layer statistics are ~50x smaller
        than the penultimate layer), so that KID's polynomial kernel sees values of order 1 and
        the FDs of the groups are on one scale.
        """
        return (self.raw_features(x) - self.feature_shift) * self.feature_scale

    def fd_columns(self) -> torch.Tensor:
        """Indices of the ``FD_GROUPS`` columns in :meth:`all_features`."""
        columns, start = [], 0
        for name, width in self.feature_groups():
            if name in FD_GROUPS:
                columns.append(torch.arange(start, start + width))
            start += width
        return torch.cat(columns)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The FD / KID / precision-recall features ``[N, feature_dim]`` of images ``[N, 1 or 3, S, S]`` in [0, 1].

        The ``FD_GROUPS`` columns of :meth:`all_features` (the calibrated penultimate layer).
        """
        return self.all_features(x)[:, self.fd_columns().to(self.feature_shift.device)]

    @torch.no_grad()
    def calibrate_features(self, images: torch.Tensor, batch_size: int = 500) -> None:
        """Set ``feature_shift`` / ``feature_scale`` from real images (the train split).

        Args:
            images: real images ``[N, 1, S, S]`` in [0, 1].
            batch_size: images per forward pass.
        """
        was_training = self.training
        self.eval()
        raw = torch.cat([self.raw_features(images[i:i + batch_size]).double()
                         for i in range(0, len(images), batch_size)])
        self.train(was_training)
        shift, var = raw.mean(0), raw.var(0)
        scale = torch.empty_like(shift)
        start = 0
        for _, width in self.feature_groups():
            group = slice(start, start + width)
            scale[group] = 1.0 / var[group].mean().clamp_min(1e-12).sqrt()
            start += width
        self.feature_shift.copy_(shift.to(self.feature_shift))
        self.feature_scale.copy_(scale.to(self.feature_scale))


# --- data -------------------------------------------------------------------------------------
def real_images(name: str, split: str = "test", n: int | None = None, seed: int = 0,
                with_labels: bool = False):
    """Real images of a classifier's dataset in [0, 1], as the generators produce them.

    Args:
        name: classifier name (``"digits"``: ``[N, 1, 8, 8]``; ``"fmnist"``: ``[N, 1, 32, 32]``,
            28x28 padded with background) or a zoo teacher name.
        split: ``"train"`` or ``"test"`` (the splits of :mod:`fastgen.zoo.data`).
        n: number of images; ``None`` for the whole split, otherwise a random subset drawn with
            ``seed`` (in a fixed order, so the same call gives the same images).
        seed: seed of the subset draw.
        with_labels: also return the ``[N]`` integer labels.
    """
    name = classifier_for(name)
    check_choice("split", split, ("train", "test"))
    images, labels = _load_split(name, split)
    if n is not None and not 0 < n <= len(images):
        raise ValueError(f"n must be in 1..{len(images)} for the {name} {split} split, not {n}.")
    if n is None or n == len(images):
        images, labels = images.clone(), labels.clone()
    else:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images, labels = images[pick], labels[pick]
    return (images, labels) if with_labels else images


def real_images_of_classes(name: str, labels, split: str = "train", seed: int = 0) -> torch.Tensor:
    """Real images whose classes are ``labels``, in that order: image ``i`` is of class ``labels[i]``.

    The images of each class are drawn without replacement with ``seed``, so the set has the
    class counts (and order) of ``labels`` -- e.g. real images matching the prompted classes of a
    generated set, for a real-data floor at the same images per class.

    Args:
        name: classifier name or zoo teacher name.
        labels: ``N`` class indices in 0..9 (a sequence or tensor).
        split: ``"train"`` or ``"test"``.
        seed: seed of the draws.
    """
    name = classifier_for(name)
    check_choice("split", split, ("train", "test"))
    labels = torch.as_tensor(labels).flatten()
    if labels.dtype.is_floating_point or (len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES)):
        raise ValueError(f"labels must be integer class indices 0..{NUM_CLASSES - 1}, got {labels.tolist()[:10]}...")
    images, split_labels = _load_split(name, split)
    out = torch.empty((len(labels), *images.shape[1:]), dtype=images.dtype)
    generator = torch.Generator().manual_seed(seed)
    for c in labels.unique().tolist():
        wanted = torch.nonzero(labels == c).flatten()
        pool = torch.nonzero(split_labels == c).flatten()
        if len(wanted) > len(pool):
            raise ValueError(f"labels ask for {len(wanted)} images of class {c}; the {name} {split} split has "
                             f"{len(pool)}.")
        out[wanted] = images[pool[torch.randperm(len(pool), generator=generator)[:len(wanted)]]]
    return out


@functools.lru_cache(maxsize=4)
def _load_split(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split in [0, 1], loaded once per process (Fashion-MNIST takes ~1 s to decompress)."""
    from fastgen.zoo.data import load_digits, load_fashion_mnist

    images, labels = load_digits(split) if name == "digits" else load_fashion_mnist(split)
    return (images + 1) / 2, labels


# --- loading ------------------------------------------------------------------------------------
def classifier_dir(name: str) -> Path:
    """Installed folder of classifier ``name`` (a classifier or zoo teacher name)."""
    return CLASSIFIER_DIR / classifier_for(name)


def _missing(name: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"Classifier {name!r} has no {path.name} at {path.parent}; create it with "
                             f"`{train_command(name)}` (or `fastgen classifier {name}`).")


def load_classifier(name: str, device: str | torch.device = "cpu") -> DomainClassifier:
    """The shipped classifier ``name`` in eval mode.

    Args:
        name: ``"digits"`` or ``"fmnist"``, or a zoo teacher name (``"fmnist-ldm"``).
        device: where to put the model.
    """
    name = classifier_for(name)
    return _load_folder(name, classifier_dir(name)).to(device).eval()


def _load_folder(name: str, folder: Path) -> DomainClassifier:
    from safetensors.torch import load_file

    for file in ("config.json", "model.safetensors"):
        if not (folder / file).is_file():
            raise _missing(name, folder / file)
    config = json.loads((folder / "config.json").read_text())
    model = DomainClassifier(config["architecture"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


def load_reference_stats(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, n)``: mean and covariance of the classifier's features on ``n`` real test images.

    Args:
        name: ``"digits"`` or ``"fmnist"``, or a zoo teacher name.
    """
    name = classifier_for(name)
    path = classifier_dir(name) / "reference_stats.npz"
    if not path.is_file():
        raise _missing(name, path)
    with np.load(path) as stats:
        return stats["mu"], stats["sigma"], int(stats["n"])


@torch.no_grad()
def extract(model: DomainClassifier, images: torch.Tensor, what: str = "features", batch_size: int = 500) -> torch.Tensor:
    """Run ``model`` over ``images`` in batches (no grad) and return the stacked CPU float32 output.

    Args:
        model: a :class:`DomainClassifier`.
        images: ``[N, 1 or 3, S, S]`` in [0, 1] (any device).
        what: ``"features"`` (``model.features``), ``"all_features"`` (``model.all_features``, every
            group) or ``"logits"`` (``model(x)``).
        batch_size: images per forward pass.
    """
    functions = {"features": model.features, "all_features": model.all_features, "logits": model}
    if what not in functions:
        raise ValueError(f"what must be one of {', '.join(functions)}, not {what!r}.")
    fn = functions[what]
    was_training = model.training
    model.eval()
    try:
        out = [fn(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


# --- training -----------------------------------------------------------------------------------
def _augment(x: torch.Tensor, max_shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random integer shifts (background 0 fill) and optional horizontal flips, per image."""
    n, _, h, w = x.shape
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if max_shift > 0:
        s = max_shift
        padded = F.pad(x, (s, s, s, s), value=0.0)
        dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        rows = (torch.arange(h)[None] + dy[:, None])[:, :, None]  # [n, h, 1]
        cols = (torch.arange(w)[None] + dx[:, None])[:, None, :]  # [n, 1, w]
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    return x


def _accuracy(model: DomainClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = extract(model, images, "logits")
    return float((logits.argmax(1) == labels).float().mean())


def feature_sanity(name: str, model: DomainClassifier | None = None, n: int | None = None) -> dict[str, float]:
    """FD between the real test split and (distorted) real train images: the metric's floor and its response.

    Returns ``{"n": n, "floor": FD(train, test), "blur3": ..., "blur5": ..., "gauss1": ...,
    "noise0.05": ..., "noise0.1": ...}``: train images as they are, box-blurred 3x3 / 5x5,
    Gaussian-blurred (5x5, sigma 1), and with Gaussian noise of std 0.05 / 0.1 (clipped to [0, 1]).

    Args:
        name: classifier name.
        model: the classifier (default: the shipped one).
        n: images per side (default: the size of the test split, capped at the train split's).
    """
    from scipy.linalg import LinAlgWarning

    from fastgen.eval.metrics import blur, feature_stats, frechet_distance

    model = model if model is not None else load_classifier(name)
    test = real_images(name, "test")
    n = min(len(test), len(_load_split(classifier_for(name), "train")[0])) if n is None else n
    test, train = test[:n], real_images(name, "train", n=n)
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(0))
    variants = {
        "floor": train,
        "blur3": blur(train, 3, "box"),
        "blur5": blur(train, 5, "box"),
        "gauss1": blur(train, 5, "gaussian", sigma=1.0),
        "noise0.05": (train + 0.05 * noise).clamp(0, 1),
        "noise0.1": (train + 0.1 * noise).clamp(0, 1),
    }
    mu_ref, sigma_ref = feature_stats(extract(model, test).double().numpy())
    out: dict[str, float] = {"n": n}
    for key, images in variants.items():
        mu, sigma = feature_stats(extract(model, images).double().numpy())
        with warnings.catch_warnings():
            # a 5x5 blur of 8x8 digits silences some edge channels on every image: a singular
            # covariance, expected here (the distance stays finite and large)
            warnings.simplefilter("ignore", LinAlgWarning)
            out[key] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    return out


def _write_readme(folder: Path, name: str, record: dict) -> None:
    arch, train = record["architecture"], record["training"]
    data = {"digits": "scikit-learn's 8x8 digits (`fastgen.zoo.data.load_digits`: 1,497 train / 300 test, fixed split)",
            "fmnist": "Fashion-MNIST from Debian's `dataset-fashion-mnist` (`fastgen.zoo.data.load_fashion_mnist`: "
                      "60,000 train / 10,000 test, 28x28 padded to 32x32)"}[name]
    sanity = record["feature_sanity"]
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in sanity.items() if k != "n")
    text = f"""# `{name}` domain classifier

Feature extractor of fastgen's domain FD / KID and the judge of prompt accuracy
(`fastgen.eval.classifiers`, `fastgen.eval.metrics`). Input: `[N, 1, {arch['image_size']}, {arch['image_size']}]` in [0, 1].

- Data: {data}, scaled to [0, 1].
- Architecture: 3 conv blocks (conv 3x3 + BatchNorm + ReLU) with channels {tuple(arch['channels'])}, 2x max-pool
  after blocks 1 and 2, average pool to {arch['head_pool']}x{arch['head_pool']}, FC {arch['hidden']}, FC 10
  ({record['parameters']:,} parameters).
- Features: 5 groups -- spatial mean + std of block 1 and block 2, and the penultimate layer (before its
  ReLU) -- each centred and scaled to unit mean variance on the train split. FD, KID, per-class FD and
  precision / recall use the group(s) {', '.join(f'`{g}`' for g in record['fd_groups'])} ({record['feature_dim']} dims;
  `FD_GROUPS` in `fastgen.eval.classifiers`).
- Training: seed {record['seed']}, {train['epochs']} epochs, batch {train['batch_size']}, AdamW lr {train['lr']}
  (cosine), random shifts up to {train['max_shift']} px{', horizontal flips' if train['hflip'] else ''}.
- Command: `{record['command']}`
- Test accuracy: **{record['test_accuracy'] * 100:.2f}%** on {record['test_images']:,} test images.
- Wall time: {record['wall_time_s']:.0f} s, CPU time {record['cpu_time_s']:.0f} s (training, calibration, test accuracy, reference statistics;
  the distortion table below took another {record['feature_sanity_time_s']:.0f} s) on {record['machine']}.
- `reference_stats.npz`: FD-feature mean `mu`, covariance `sigma` and count `n` on the {record['test_images']:,} test images;
  it, this table and this README are rewritten from the weights by `{train_command(name)} --reference-only`.

Response of the FD to distortions (real train images vs the real test split, n = {sanity['n']:,} each side;
`feature_sanity` in `fastgen.eval.classifiers`):

| train images | FD to test |
|---|---|
{rows}

"floor" is the real-vs-real distance at this sample size: a generator cannot be expected to score lower.
"""
    (folder / "README.md").write_text(text)


def train_classifier(name: str, out_dir: str | Path | None = None, seed: int = 0, epochs: int | None = None,
                     progress: bool = True, machine: str | None = None, replace_installed: bool = False) -> Path:
    """Train classifier ``name`` on its real train split and write its folder; returns the folder.

    Writes ``model.safetensors``, ``config.json`` (architecture, training arguments, seed, test
    accuracy, wall time, command), ``reference_stats.npz`` (feature ``mu``, ``sigma`` and ``n``
    on the real test split) and ``README.md``.

    Args:
        name: ``"digits"`` or ``"fmnist"`` (or a zoo teacher name).
        out_dir: output folder (default ``./zoo/classifiers/<name>``); the installed
            ``fastgen/zoo/classifiers/<name>/`` only with ``replace_installed``. Written under a temporary name,
            then renamed.
        seed: seed of initialisation, shuffling and augmentation.
        epochs: passes over the train split (default: ``DEFAULTS[name]``).
        progress: show a tqdm progress bar.
        machine: description of the machine for the README (default: the CPU/GPU count).
    """
    name = classifier_for(name)
    arch, train = DEFAULTS[name]
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {epochs!r}.")
        train = TrainConfig(**{**asdict(train), "epochs": epochs})
    final = installed_output(out_dir, classifier_dir(name), replace_installed, USER_DIR / "classifiers" / name)
    with writing_folder(final, marker="model.safetensors", what="Classifier folder") as folder:
        _train_into(folder, name, arch, train, seed, epochs, progress, machine)
        keep_other_files(final, folder)
    return final


def _train_into(folder: Path, name: str, arch, train, seed: int, epochs: int | None, progress: bool,
                machine: str | None) -> None:
    """The body of :func:`train_classifier`: train and write every file into ``folder``."""
    from safetensors.torch import save_file

    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    images, labels = real_images(name, "train", with_labels=True)
    test_images, test_labels = real_images(name, "test", with_labels=True)
    model = DomainClassifier(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = (len(images) + train.batch_size - 1) // train.batch_size
    total = steps_per_epoch * train.epochs
    warmup = steps_per_epoch

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(total - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    bar = tqdm(total=total, desc=f"classifier {name}", disable=not progress)
    model.train()
    for epoch in range(train.epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), train.batch_size):
            idx = order[i:i + train.batch_size]
            x = _augment(images[idx], train.max_shift, train.hflip, generator)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    model.calibrate_features(images)

    test_accuracy = _accuracy(model, test_images, test_labels)
    save_reference_stats(model, name, folder)
    wall, cpu = time.time() - start, time.process_time() - cpu_start
    sanity_start = time.time()
    sanity = feature_sanity(name, model)
    sanity_wall = time.time() - sanity_start

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    record = {
        "name": name,
        "architecture": {**asdict(arch), "channels": list(arch.channels)},
        "training": asdict(train),
        "seed": seed,
        "epochs": train.epochs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "feature_dim": model.feature_dim,
        "fd_groups": list(FD_GROUPS),
        "train_images": len(images),
        "test_images": len(test_images),
        "test_accuracy": test_accuracy,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "feature_sanity_time_s": sanity_wall,
        "machine": machine or f"{os.cpu_count()} CPU cores (torch threads: {torch.get_num_threads()})",
        "command": train_command(name) + (f" --epochs {epochs}" if epochs is not None else "")
        + (f" --seed {seed}" if seed != 0 else ""),
        "feature_sanity": sanity,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    (folder / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    _write_readme(folder, name, record)


def save_reference_stats(model: DomainClassifier, name: str, folder: Path) -> Path:
    """Write ``reference_stats.npz``: mean ``mu``, covariance ``sigma``, count ``n`` of the FD features of the test split.

    Args:
        model: the classifier (calibrated).
        name: its classifier name.
        folder: the classifier's folder.
    """
    feats = extract(model, real_images(name, "test")).double().numpy()
    path = Path(folder) / "reference_stats.npz"
    np.savez(path, mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), n=np.int64(len(feats)))
    return path


def write_reference(name: str, folder: str | Path | None = None) -> Path:
    """Rewrite a trained classifier's ``reference_stats.npz``, distortion table and README from its weights.

    For a change of the FD features (:data:`FD_GROUPS`) without retraining: the weights and the
    training record in ``config.json`` stay; ``feature_dim``, ``fd_groups``, ``feature_sanity``
    and ``feature_sanity_time_s`` are replaced.

    Args:
        name: ``"digits"`` or ``"fmnist"`` (or a zoo teacher name).
        folder: the classifier's folder (default: the installed one).
    """
    name = classifier_for(name)
    folder = Path(folder) if folder is not None else classifier_dir(name)
    model = _load_folder(name, folder)
    save_reference_stats(model, name, folder)
    start = time.time()
    sanity = feature_sanity(name, model)
    record = json.loads((folder / "config.json").read_text())
    record.update(feature_dim=model.feature_dim, fd_groups=list(FD_GROUPS), feature_sanity=sanity,
                  feature_sanity_time_s=time.time() - start)
    (folder / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    _write_readme(folder, name, record)


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.eval.classifiers NAME [--out DIR | --replace-installed] [--seed S] [--epochs E]
    [--machine TEXT] [--reference-only]``."""
    parser = argparse.ArgumentParser(prog="python -m fastgen.eval.classifiers",
                                     description="Train a zoo domain classifier (weights, reference stats, README).")
    parser.add_argument("name", choices=NAMES, help="which classifier to train")
    parser.add_argument("--out", default=None, help="output folder (default: ./zoo/classifiers/NAME; with "
                                                    "--reference-only: the installed one)")
    parser.add_argument("--replace-installed", action="store_true",
                        help="train into the installed fastgen/zoo/classifiers/NAME, replacing the shipped classifier")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the shipped recipe)")
    parser.add_argument("--machine", default=None, help="machine description written to the README")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--reference-only", action="store_true",
                        help="do not train: rewrite reference_stats.npz, the distortion table and the README from "
                             "the weights in --out (default: the installed folder)")
    args = parser.parse_args(argv)
    if args.reference_only:
        folder = write_reference(args.name, args.out)
        print(f"{args.name}: rewrote reference_stats.npz, config.json and README.md in {folder}")
        return 0
    folder = train_classifier(args.name, args.out, seed=args.seed, epochs=args.epochs,
                              progress=not args.no_progress, machine=args.machine,
                              replace_installed=args.replace_installed)
    record = json.loads((folder / "config.json").read_text())
    print(f"{args.name}: test accuracy {record['test_accuracy'] * 100:.2f}%, {record['wall_time_s']:.0f} s -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
