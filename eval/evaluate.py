"""``fastgen eval``: generate with a pipeline, score the images, write metrics.json, a table and a grid.

Metrics (``--metrics``, comma-separated):

* ``fd``, ``kid`` -- domain Fréchet distance and KID on the zoo classifier's features against the
  real test split; the real-vs-real floor (train split vs test split, same N) is reported beside them.
* ``acc`` -- prompt adherence: the classifier's accuracy on the prompted classes (fmnist-ldm).
* ``fid`` -- clean-fid FID (Inception) against ``--fid-reference`` (folder, dataset name or stats file).
* ``clip`` -- CLIP score through open_clip (``--clip-model`` / ``--clip-pretrained``).
* ``speed`` -- images/s, seconds per image, NFE, peak memory.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from fastgen import zoo
from fastgen.pipelines.images import save_grid

from .generate import Generated, generate, load_pipeline, solver_scheduler, zoo_name_of
from .speed import PeakMemory, speed_row

METRICS = ("fd", "kid", "acc", "fid", "clip", "speed")
DEFAULT_METRICS = ("fd", "kid", "acc", "speed")


def parse_metrics(text: str | list[str] | tuple) -> list[str]:
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in items if m not in METRICS]
    if unknown or not items:
        raise ValueError(f"Unknown metric(s) {unknown or text!r}; choose from {', '.join(METRICS)}.")
    return items


@functools.lru_cache(maxsize=8)
def real_floor(zoo_name: str, num_images: int, with_kid: bool) -> dict:
    """FD / KID of real train images against the real test split at the same sample size."""
    from .classifiers import real_images
    from .metrics import fd_kid_from_images

    n = min(num_images, len(real_images(zoo_name, "train")))
    return fd_kid_from_images(real_images(zoo_name, "train", n=n, seed=1), zoo_name, compute_kid=with_kid)


def score(gen: Generated, zoo_name: str | None, metrics: list[str], fid_reference=None,
          clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai") -> dict:
    """The requested metrics of generated images (speed is added by the caller)."""
    from .metrics import clean_fid, clip_score, fd_kid_from_images, prompt_accuracy

    result: dict = {}
    if {"fd", "kid", "acc"} & set(metrics) and zoo_name is None:
        raise ValueError("fd, kid and acc use the zoo's domain classifiers: evaluate a zoo teacher or a student of "
                         "one, or use --metrics fid,clip,speed for other pipelines.")
    if "fd" in metrics or "kid" in metrics:
        out = fd_kid_from_images(gen.images, zoo_name, compute_kid="kid" in metrics)
        floor = real_floor(zoo_name, len(gen.images), "kid" in metrics)
        result["fd"], result["fd_floor"] = out["fd"], floor["fd"]
        if "kid" in metrics:
            result["kid"], result["kid_floor"] = out["kid"], floor["kid"]
    if "acc" in metrics and gen.labels is not None:
        result["acc"] = prompt_accuracy(gen.images, gen.labels, zoo_name)
    if "fid" in metrics:
        result["fid"] = clean_fid(gen.images, fid_reference)
    if "clip" in metrics:
        if gen.prompts is None:
            raise ValueError("--metrics clip needs a text-to-image pipeline.")
        result["clip"] = clip_score(gen.images, gen.prompts, clip_model, clip_pretrained)
    return result


def run_one(pipe, zoo_name, metrics, num_images, steps=None, timesteps=None, guidance=None, seed=0,
            batch_size=100, device="cpu", progress=True, **score_kwargs) -> tuple[dict, Generated]:
    """Generate (timed, peak memory) and score one configuration."""
    with PeakMemory(device) as mem:
        gen = generate(pipe, num_images, steps, timesteps, guidance, batch_size=batch_size, seed=seed,
                       progress=progress)
    row = score(gen, zoo_name, metrics, **score_kwargs)
    if "speed" in metrics:
        row.update(speed_row(num_images, gen.seconds, gen.nfe, mem.peak_mb))
    row["nfe"] = gen.nfe
    return row, gen


def student_call(pipe) -> dict:
    """``{"steps"|"timesteps", "guidance"}`` from an exported student's fastgen metadata ({} for others)."""
    meta = dict(pipe.scheduler.config).get("fastgen") or {}
    if not meta:
        return {}
    call = {"guidance": meta.get("guidance_scale")}
    if "timesteps=" in meta.get("call", ""):
        call["timesteps"] = meta["timesteps"]
    else:
        call["steps"] = meta["num_steps"]
    return call


def fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def evaluate(target: str, steps: int | None = None, timesteps: list[int] | None = None,
             guidance: float | None = None, num_images: int = 1000, metrics=DEFAULT_METRICS,
             out: str | Path | None = None, solver: str | None = None, batch_size: int = 100, seed: int = 0,
             fid_reference=None, clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai",
             device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate one pipeline (zoo name, folder or hub id) and write ``metrics.json``, ``metrics.md``, ``samples.png``.

    Args:
        target: what to evaluate; an exported student is called as its metadata says unless
            ``steps`` / ``timesteps`` / ``guidance`` override it.
        steps, timesteps: step count or explicit timesteps (one of them; required for teachers).
        guidance: classifier-free guidance scale (default: the student's, or the zoo teacher's recommended).
        num_images: images to generate (FD/KID need at least 10; use >= 1000 for stable numbers).
        metrics: subset of :data:`METRICS`.
        out: output folder (default: no files).
        solver: replace the pipeline's scheduler by a training-free solver (ddim, dpm++2m, unipc, euler).
    """
    from .metrics import MIN_IMAGES_FD

    metrics = parse_metrics(metrics)
    if {"fd", "kid"} & set(metrics) and num_images < MIN_IMAGES_FD:  # fail before generating anything
        raise ValueError(f"fd and kid need at least {MIN_IMAGES_FD} images; got --num-images {num_images}.")
    if "fid" in metrics and fid_reference is None:
        raise ValueError("--metrics fid needs --fid-reference (an image folder, a clean-fid dataset name or a "
                         ".npz statistics file).")
    pipe = load_pipeline(target, device if device != "cpu" else None)
    zoo_name = zoo_name_of(pipe, target)
    call = student_call(pipe)
    if solver:
        pipe.scheduler = solver_scheduler(solver, pipe.scheduler.config)
    steps = steps if steps is not None or timesteps else call.get("steps")
    timesteps = timesteps or (call.get("timesteps") if steps is None else None)
    if steps is None and not timesteps:
        raise ValueError(f"{target} is not a fastgen student: give --steps or --timesteps.")
    if guidance is None:
        guidance = call.get("guidance", zoo.RECOMMENDED_GUIDANCE.get(zoo_name) if zoo_name else None)
    row, gen = run_one(pipe, zoo_name, metrics, num_images, steps, timesteps, guidance, seed, batch_size, device,
                       progress, fid_reference=fid_reference, clip_model=clip_model, clip_pretrained=clip_pretrained)
    result = {"target": target, "zoo": zoo_name, "solver": solver, "call": {k: v for k, v in gen.call.items()},
              "guidance": guidance, "num_images": num_images, "seed": seed, "threads": torch.get_num_threads(),
              "metrics": row}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        (out / "metrics.md").write_text(metrics_markdown(result))
        save_grid(gen.images[:100], out / "samples.png", nrow=10, scale=4 if gen.images.shape[-1] <= 32 else 1)
    return result


def metrics_markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# fastgen eval: {result['target']}", "",
             f"call: `{result['call']}`, guidance {result['guidance']}, {result['num_images']} images, seed "
             f"{result['seed']}, {result['threads']} CPU threads", "", "| metric | value | real-data floor |",
             "|---|---:|---:|"]
    for key in ("fd", "kid", "acc", "fid", "clip", "images_per_s", "s_per_image", "nfe", "peak_memory_mb"):
        if key in m:
            lines.append(f"| {key} | {fmt(m[key], 4)} | {fmt(m.get(key + '_floor'), 4)} |")
    return "\n".join(lines) + "\n"


def training_evaluator(folder: str, num_images: int, device: str = "cpu") -> dict:
    """What training-time evaluation reports for an exported student folder (``train.eval_every``)."""
    pipe_is_text = (Path(folder) / "text_encoder").is_dir()
    result = evaluate(folder, num_images=num_images, metrics="fd,acc" if pipe_is_text else "fd", progress=False,
                      device=device)
    return {k: v for k, v in result["metrics"].items() if k in ("fd", "acc")}
