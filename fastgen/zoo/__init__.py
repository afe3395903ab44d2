"""The zoo: tiny real teachers trained on real data, shipped as plain diffusers folders.

* ``digits-ddpm`` -- pixel-space ``UNet2DModel`` on scikit-learn's 8x8 digits (``DDPMPipeline``).
* ``fmnist-ldm`` -- a tiny Stable Diffusion on Fashion-MNIST (``StableDiffusionPipeline``).
* ``fmnist-flow`` -- a tiny rectified-flow SD3 on the same latents, with fmnist-ldm's frozen VAE and text encoder
  (``StableDiffusion3Pipeline`` without T5, called with ``max_sequence_length=0``).

``fastgen.zoo.path(name)`` is the folder that ``DiffusionPipeline.from_pretrained`` loads.
The builders and training code live in :mod:`fastgen.train.teachers` (``fastgen zoo train``).
"""

from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
# Where `fastgen zoo train`, `zoo card` and `classifier` write by default (relative to the working folder): the
# user's folder, never the installed package (that takes --replace-installed).
USER_DIR = Path("zoo")

TEACHERS = {
    "digits-ddpm": "UNet2DModel DDPM on scikit-learn's 8x8 digits (unconditional, 1x8x8 pixels).",
    "fmnist-ldm": "Tiny Stable Diffusion on Fashion-MNIST (text-conditional, 32x32 images, 4x8x8 latents).",
    "fmnist-flow": "Tiny rectified-flow SD3 on Fashion-MNIST (text-conditional, fmnist-ldm's VAE, text encoder "
                   "and 4x8x8 latents).",
}

FMNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")
PROMPT_TEMPLATE = "a photo of a {}"

# Classifier-free guidance scale that gives the best samples, per teacher (None: unconditional).
# fmnist-ldm: at 50 DDIM steps over w = 1, 1.5, 2, 2.5, 3, 4, the lowest per-class FD among the scales
# with prompt accuracy >= 90% -- diversity within each prompted class, at a floor on prompt adherence
# (see its guidance_sweep.md: w = 2, per-class FD 7.03, accuracy 92.4%; w = 3 has 11.55 and 97.0%).
# fmnist-flow: 2.0 until its own sweep (the lead's full training run) says otherwise -- the same prompts, latents and
# dropout of empty prompts as fmnist-ldm.
RECOMMENDED_GUIDANCE = {"digits-ddpm": None, "fmnist-ldm": 2.0, "fmnist-flow": 2.0}
# The zoo's Fashion-MNIST teachers (the class prompts, the fmnist classifier, the real images of data.real = "zoo").
FMNIST_TEACHERS = ("fmnist-ldm", "fmnist-flow")


def names() -> list[str]:
    """Names of the zoo's teachers."""
    return list(TEACHERS)


def prompts() -> list[str]:
    """The Fashion-MNIST teachers' prompts, one per class, in label order."""
    return [PROMPT_TEMPLATE.format(c) for c in FMNIST_CLASSES]


def path(name: str, check: bool = True) -> Path:
    """Folder of a zoo teacher, loadable with ``DiffusionPipeline.from_pretrained``.

    Raises ``KeyError`` for an unknown name and ``FileNotFoundError`` when the weights are
    missing (``check=True``); ``fastgen zoo train NAME`` rebuilds them.
    """
    if name not in TEACHERS:
        raise KeyError(f"Unknown zoo teacher {name!r}; available: {', '.join(TEACHERS)}.")
    folder = ZOO_DIR / name
    if check and not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"Zoo teacher {name!r} has no weights at {folder}; run `fastgen zoo train {name}`.")
    return folder


def name_of(name_or_path: str) -> str | None:
    """The zoo teacher a name or folder is (``None`` for anything else, e.g. a hub id)."""
    if name_or_path in TEACHERS:
        return name_or_path
    for name in TEACHERS:
        if Path(name_or_path).resolve() == path(name, check=False).resolve():
            return name
    return None


def resolve(name_or_path: str) -> str:
    """A zoo name becomes its folder; anything else (a folder or a hub id) is returned unchanged."""
    return str(path(name_or_path)) if name_or_path in TEACHERS else name_or_path
