"""``fastgen demo``: distill fmnist-ldm into a 1-step student with DMD2 and prove it with numbers.

1. Train: the shipped recipe ``dmd2_fmnist_1step`` (data-free DMD2: prompts only, no real images)
   with ``DEMO_OVERRIDES``, for ``--train-steps`` iterations, with a progress bar and checkpoints (a killed demo resumes).
2. Export: ``OUT/run/student`` is a plain diffusers ``StableDiffusionPipeline`` with an ``LCMScheduler``.
3. Evaluate on the same prompts and seed: the teacher at 50 DDIM steps, the teacher at 1 DDIM step
   and the student at 1 step -- domain FD, per-class FD, pixel FD, precision, recall, coverage, prompt
   accuracy, images/s, speed-up over the teacher.
4. Write ``OUT/demo.md``, ``OUT/demo.json`` and ``OUT/comparison.png`` and print the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastgen import zoo
from fastgen.pipelines.images import save_panels
from fastgen.pipelines.prompts import load_prompts
from fastgen.zoo.data import check_fashion_mnist

DEMO_RECIPE = "dmd2_fmnist_1step"
# A 10-minute run is not the 30-minute recipe: a short EMA (0.99 lags by ~500 iterations, a fifth of the run).
# The demo keeps the settings its README table was measured with: teacher guidance 2 and no regression loss (the
# recipe's regression needs 2048 teacher ODE pairs first, ~9 minutes here), EMA 0.9 for a 2500-step run.
DEMO_OVERRIDES = ("student.ema_decay=0.9", "dmd2.guidance_scale=2", "dmd2.regression_weight=0")
# The metrics of the demo's table (docs/evaluation.md); fd_class needs 10 images per class (100 in all).
DEMO_METRICS = ("fd", "fd_class", "fd_pixel", "precision", "recall", "coverage", "acc", "speed")


def run_demo(out: str | Path = "fastgen-demo", train_steps: int = 2500, num_images: int = 1000, seed: int = 0,
             guidance_scale: float | None = None, overrides: list[str] = (), device: str = "cpu",
             prompts: str | None = None) -> dict:
    """Distill, export, evaluate; returns the result table as a dict.

    Args:
        out: output folder (the run, the exported student, the table and the grid).
        train_steps: DMD2 training iterations (about 0.2 s each on 2 CPU cores).
        num_images: images per evaluated sampler (FD needs at least 10; 1000 gives stable numbers).
        seed: seed of training and of the evaluation noise.
        guidance_scale: the teacher's guidance in its evaluation rows (default: ``fastgen.zoo.RECOMMENDED_GUIDANCE``).
            Training uses the recipe's ``dmd2.guidance_scale`` unless ``overrides`` set it.
        overrides: further recipe overrides (``"section.key=value"``), applied after ``DEMO_OVERRIDES``.
        device: torch device of the evaluation (training runs where accelerate puts it).
        prompts: a text file with one prompt per line for training and evaluation (default: the zoo's class
            prompts; with others the table leaves out prompt accuracy and the per-class FD).
    """
    from fastgen.eval.evaluate import check_counts, fmt, run_one, training_evaluator
    from fastgen.eval.generate import load_pipeline, solver_scheduler
    from fastgen.train.runner import run_training
    from fastgen.train.trainer import latest_checkpoint

    steps = train_steps
    if steps < 1 or num_images < 10:
        raise ValueError(f"--train-steps must be >= 1 and --num-images >= 10 (got {steps} and {num_images}).")
    check_fashion_mnist()  # the evaluation's real images, checked before the training rather than after it
    metrics = list(DEMO_METRICS)
    prompt_list = None if prompts is None or prompts == "zoo" else load_prompts(prompts)
    if prompt_list is not None:
        metrics = [m for m in metrics if m not in ("fd_class", "acc")]
        print("note: with other prompts than the zoo's class prompts the table has no accuracy and no per-class FD")
    try:
        check_counts(metrics, num_images, len(zoo.prompts()))
    except ValueError:  # a quick demo with fewer images: the table leaves out only the per-class FD
        metrics.remove("fd_class")
        print(f"note: --num-images {num_images} is too few for the per-class FD (10 per class); it is left out")
    out = Path(out)
    guidance = guidance_scale if guidance_scale is not None else zoo.RECOMMENDED_GUIDANCE["fmnist-ldm"]
    run_dir = out / "run"
    overrides = [f"train.steps={steps}", f"seed={seed}", *DEMO_OVERRIDES,
                 *([f"data.prompts={prompts}"] if prompt_list is not None else []), *overrides]
    print(f"[1/3] distilling fmnist-ldm into a 1-step student: DMD2, {steps} steps -> {run_dir}")
    student_dir = run_training(DEMO_RECIPE, overrides, out=str(run_dir),
                               resume=latest_checkpoint(run_dir / "checkpoints") is not None,
                               evaluate_folder=training_evaluator)

    print(f"[2/3] evaluating teacher (50 steps), teacher (1 step) and student (1 step) on {num_images} images")
    on_device = device if device != "cpu" else None
    teacher = load_pipeline("fmnist-ldm", on_device)
    teacher.scheduler = solver_scheduler("ddim", teacher.scheduler.config)
    student = load_pipeline(str(student_dir), on_device)
    rows, images = [], {}
    for label, pipe, n_steps, w in [("teacher, DDIM", teacher, 50, guidance), ("teacher, DDIM", teacher, 1, guidance),
                                    ("DMD2 student", student, 1, 0.0)]:
        row, gen = run_one(pipe, "fmnist-ldm", metrics, num_images, steps=n_steps, guidance=w, seed=seed,
                           device=device, prompts=prompt_list)
        rows.append({"sampler": label, "steps": n_steps, **row})
        images[f"{label}, {n_steps} step{'s' if n_steps > 1 else ''}"] = gen.images[:40]
    base = rows[0]["s_per_image"]
    for r in rows:
        r["speedup"] = base / r["s_per_image"]
        r["fd_vs_teacher"] = r["fd"] / rows[0]["fd"]

    print("[3/3] writing the table and the grid")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"fastgen demo: fmnist-ldm -> 1-step DMD2 student ({steps} training steps), {num_images} images per "
             f"row, seed {seed}, {torch.get_num_threads()} CPU threads", "",
             "| sampler | steps | FD | FD / teacher-50 | per-class FD | pixel FD | precision | recall | coverage | "
             "accuracy | images/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {fmt(r['fd'], 2)} | {r['fd_vs_teacher']:.2f}x | "
              f"{fmt(r.get('fd_class'), 2)} | {fmt(r['fd_pixel'], 2)} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['coverage']:.3f} | {fmt(r['acc'] * 100, 1) + '%' if 'acc' in r else '-'} | "
              f"{r['images_per_s']:.1f} | {r['speedup']:.1f}x |"
              for r in rows]
    floor = rows[0]
    lines += ["", f"real data (train vs test, same N and classes): FD {fmt(floor['fd_floor'], 2)}, per-class FD "
              f"{fmt(floor.get('fd_class_floor'), 2)}, pixel FD {fmt(floor['fd_pixel_floor'], 2)}, precision "
              f"{floor['precision_floor']:.3f}, recall {floor['recall_floor']:.3f}, coverage "
              f"{floor['coverage_floor']:.3f}. Recall and coverage measure diversity: a mode-seeking student "
              "can match the teacher's FD with a lower recall."]
    grid = save_panels(images, out / "comparison.png", nrow=10,
                       title="columns: t-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot")
    table = "\n".join(lines) + "\n"
    (out / "demo.md").write_text(table)
    result = {"train_steps": steps, "num_images": num_images, "seed": seed, "guidance": guidance,
              "student": str(student_dir), "rows": rows}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    print("\n" + table)
    print(f"student (plain diffusers): {student_dir}\ngrid: {grid}\ntable: {out / 'demo.md'}")
    return result
