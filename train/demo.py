"""``fastgen demo``: the fmnist-ldm teacher at 1, 2, 4 and 50 steps, side by side, with timings.

First version of the main job: it shows the cost that distillation removes (50 steps) and the
quality that naive few-step sampling loses (1-4 steps). A later version distills a student here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from fastgen import zoo
from fastgen.pipelines.images import save_panels

from .cards import GRID_STEPS, sample_grid_panels


def run_demo(out: str | Path = "fastgen-demo", num_images: int = 2, seed: int = 0,
             guidance_scale: float | None = None) -> dict:
    """Sample the teacher at each step count, write ``teacher_steps.png`` and ``summary.{txt,json}``.

    Args:
        out: output folder.
        num_images: images per class (10 classes) at each step count.
        seed: seed of the initial noise (the same noise at every step count).
        guidance_scale: classifier-free guidance (default: the teacher's recommended scale).
    """
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    guidance = guidance_scale if guidance_scale is not None else zoo.RECOMMENDED_GUIDANCE["fmnist-ldm"]
    pipe = DiffusionPipeline.from_pretrained(zoo.path("fmnist-ldm"))
    pipe.set_progress_bar_config(disable=True)
    panels, rows = {}, []
    n_images = num_images * len(zoo.FMNIST_CLASSES)
    sample_grid_panels(pipe, steps=(1,), per_class=1, seed=seed, guidance_scale=guidance)  # warm-up, not timed
    for steps in GRID_STEPS:
        start = time.perf_counter()
        panels.update(sample_grid_panels(pipe, steps=(steps,), per_class=num_images, seed=seed,
                                         guidance_scale=guidance))
        seconds = time.perf_counter() - start
        rows.append({"steps": steps, "seconds_per_image": seconds / n_images,
                     "images_per_second": n_images / seconds})
        print(f"  {steps:>2} steps: {seconds / n_images * 1000:7.1f} ms/image")
    grid = save_panels(panels, out / "teacher_steps.png", nrow=num_images, row_labels=zoo.FMNIST_CLASSES,
                       title=f"fmnist-ldm teacher, DDIM, guidance {guidance}")
    summary = {"teacher": "fmnist-ldm", "guidance_scale": guidance, "images_per_step_count": n_images,
               "threads": torch.get_num_threads(), "rows": rows, "grid": str(grid)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"fastgen demo: fmnist-ldm teacher, DDIM, guidance {guidance} (each step evaluates the UNet on the "
             f"prompt and the empty prompt in one batch), {n_images} images per step count, "
             f"{torch.get_num_threads()} threads", "", "| steps | s / image | images / s |", "|---:|---:|---:|"]
    lines += [f"| {r['steps']} | {r['seconds_per_image']:.4f} | "
              f"{r['images_per_second']:.1f} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {grid}\nwrote {out / 'summary.md'} and {out / 'summary.json'}")
    return summary
