"""fastgen's Python API: what the ``fastgen`` command does, as functions (importable from ``fastgen``).

* :func:`train` -- distill a student from a recipe and export it (``fastgen train``);
* :func:`evaluate` -- generate with a pipeline and score it, returning the metrics (``fastgen eval``);
* :func:`export` -- export the student of a run or checkpoint without training (``fastgen export``).

``import fastgen`` imports none of this (nor torch): ``fastgen.train``, ``fastgen.evaluate``,
``fastgen.export`` and the pipeline classes are loaded on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence


def override_strings(overrides: Mapping[str, object] | Sequence[str] | None) -> list[str]:
    """``{"train.steps": 100}`` or ``["train.steps=100"]`` -> ``["train.steps=100"]`` (values of a mapping are
    written as TOML, which for numbers, booleans, strings and lists is their JSON)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return [str(text) for text in overrides]


def train(recipe: str | Path, out: str | Path | None = None,
          overrides: Mapping[str, object] | Sequence[str] | None = None, resume: bool | str | Path = False,
          teacher: str | None = None, allow_pickle: bool = False) -> Path:
    """Distill a student as ``recipe`` says, export it, and return the exported diffusers folder (``<out>/student``).

    Args:
        recipe: a shipped recipe name (``"dmd2_fmnist_1step"``), a TOML file, or a run's ``recipe.json``.
        out: the run folder (default: the recipe's ``out``; a run's ``recipe.json``: its folder; else
            ``runs/<recipe name>``).
        overrides: recipe keys to change, ``{"train.steps": 100, "optim.generator.lr": 1e-4}`` or
            ``["train.steps=100"]`` (as ``--set``).
        resume: ``True`` continues from the run's latest checkpoint, a checkpoint folder from that one.
        teacher: replaces the recipe's teacher (zoo name, diffusers folder or hub id).
        allow_pickle: let the teacher load pickled (``.bin``) weights where it has no safetensors.
    """
    from fastgen.eval.evaluate import training_evaluator
    from fastgen.train.runner import run_training

    return run_training(str(recipe), override_strings(overrides), teacher=teacher,
                        out=str(out) if out is not None else None, resume=resume, evaluate_folder=training_evaluator,
                        allow_pickle=allow_pickle)


def evaluate(target: str | Path, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
             guidance_scale: float | None = None, num_images: int = 1000, metrics: str | Sequence[str] | None = None,
             prompts: str | Sequence[str] | None = None, seed: int = 0, device: str = "cpu",
             out: str | Path | None = None, **options) -> dict:
    """Generate with a pipeline through its own call and score the images; returns the metrics dict.

    Args:
        target: a zoo teacher name, a diffusers folder (e.g. an exported student, called as its metadata says
            unless the arguments below say otherwise) or a hub id.
        num_inference_steps, timesteps: the step count or explicit timesteps (required for teachers).
        guidance_scale: classifier-free guidance (default: the student's, or the zoo teacher's recommended).
        num_images: how many images (FD needs at least 10).
        metrics: names from :data:`fastgen.eval.evaluate.METRICS` (default: ``DEFAULT_METRICS``).
        prompts: prompts to cycle through (a list, a text file or ``"zoo"``); the class metrics need the zoo's.
        seed: seed of the generator.
        device: torch device (``"cpu"``, ``"cuda"``, ...).
        out: also write ``metrics.json``, ``metrics.md`` and ``samples.png`` there.
        options: the other keywords of :func:`fastgen.eval.evaluate.evaluate` (``solver``, ``batch_size``,
            ``fid_reference``, ``clip_model``, ``allow_pickle``, ``seeds``: several evaluation seeds, whose mean
            this returns, ...).
    """
    from fastgen.eval.evaluate import DEFAULT_METRICS
    from fastgen.eval.evaluate import evaluate as run_evaluation

    result = run_evaluation(str(target), steps=num_inference_steps, timesteps=list(timesteps) if timesteps else None,
                            guidance=guidance_scale, num_images=num_images, metrics=metrics or DEFAULT_METRICS,
                            prompts=prompts, seed=seed, device=device, out=out, **options)
    return result["metrics"]


def export(run_or_checkpoint: str | Path, out: str | Path | None = None, teacher: str | None = None,
           allow_pickle: bool = False) -> Path:
    """Export the student of a run folder (its latest checkpoint) or of a checkpoint folder, without training;
    returns the plain diffusers folder (default ``<run>/student-step-<N>``).

    Args:
        run_or_checkpoint: a run folder of ``fastgen train`` or one of its ``checkpoints/checkpoint-N`` folders.
        out: output folder.
        teacher: the run's teacher, when it is no longer where the run's ``recipe.json`` says.
        allow_pickle: let the teacher load pickled (``.bin``) weights where it has no safetensors.
    """
    from fastgen.train.runner import export_checkpoint

    return export_checkpoint(run_or_checkpoint, out=out, teacher=teacher, allow_pickle=allow_pickle)


__all__ = ["train", "evaluate", "export", "override_strings"]
