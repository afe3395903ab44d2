"""Hybrid inference of a fmnist-ldm student against the plain student: FewStepPipeline's teacher steps
(diversity distillation) and teacher refinement (Distillation++), scored with ``fastgen eval``'s metrics.

    OMP_NUM_THREADS=1 python scripts/bench_hybrid.py --student runs/f1/student --num-images 1000 --out bench/hybrid

Every row generates the same prompts (the zoo's ten classes, cycled) from the same seed with one generator per
row, as ``fastgen eval`` does, and is scored by :func:`fastgen.eval.evaluate.score` (FD, per-class FD,
precision / recall / coverage, prompt accuracy) with the speed of its generation. Writes ``hybrid.json`` and
``hybrid.md`` (the table of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fastgen import zoo
from fastgen.eval.evaluate import real_floor, score
from fastgen.eval.generate import Generated
from fastgen.pipelines import FewStepPipeline

METRICS = ["fd", "fd_class", "precision", "recall", "coverage", "acc"]
# (row name, FewStepPipeline call arguments, network evaluations per image: a CFG pair counts once)
ROWS = [
    ("student", {}, 1),
    ("teacher 1 step (999), student (749)", {"teacher_steps": 1}, 2),
    ("teacher 2 steps (999, 874), student", {"teacher_steps": 2}, 3),
    ("student, teacher refine 0.5 at 749", {"teacher_refine": 0.5}, 2),
    ("student, teacher refine 0.5 at 499", {"teacher_refine": 0.5, "refine_timestep": 499}, 2),
    ("student, teacher refine 0.5 at 249", {"teacher_refine": 0.5, "refine_timestep": 249}, 2),
    ("student, teacher refine 1.0 at 249", {"teacher_refine": 1.0, "refine_timestep": 249}, 2),
]


def generate(pipe: FewStepPipeline, num_images: int, batch_size: int, seed: int, **call) -> Generated:
    """``num_images`` images of the zoo's cycled class prompts, timed (after one warm-up batch)."""
    prompts = [zoo.prompts()[i % 10] for i in range(num_images)]
    pipe(prompts[:batch_size], output_type="pt", **call)  # warm-up: not timed
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    start = time.perf_counter()
    for lo in range(0, num_images, batch_size):
        chunks.append(pipe(prompts[lo:lo + batch_size], generator=generator, output_type="pt", **call).images)
    seconds = time.perf_counter() - start
    return Generated(torch.cat(chunks).float(), torch.arange(num_images) % 10, prompts, seconds, 0, call)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="an exported fmnist-ldm student folder")
    parser.add_argument("--teacher", default="fmnist-ldm", help="the teacher (zoo name or folder)")
    parser.add_argument("--teacher-guidance", type=float, default=None,
                        help="the teacher's CFG (default: the guidance the student was distilled with)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/hybrid")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = FewStepPipeline.from_pretrained(args.student).load_teacher(args.teacher)
    w = args.teacher_guidance if args.teacher_guidance is not None else pipe.config.student.get("teacher_guidance")
    rows = []
    for name, call, nfe in ROWS:
        gen = generate(pipe, args.num_images, args.batch_size, args.seed, teacher_guidance_scale=w, **call)
        row = {"row": name, "call": call, "nfe": nfe, **score(gen, "fmnist-ldm", METRICS),
               "images_per_s": args.num_images / gen.seconds}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
    floor = real_floor("fmnist-ldm", args.num_images, METRICS, torch.arange(args.num_images) % 10)
    result = {"student": args.student, "student_metadata": pipe.config.student, "teacher": args.teacher,
              "teacher_guidance": w, "num_images": args.num_images, "seed": args.seed, "rows": rows, "floor": floor,
              "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {platform.processor() or ''}"}
    (out / "hybrid.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "hybrid.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| inference | NFE | FD | per-class FD | precision | recall | coverage | accuracy | images/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['nfe']} | {r['fd']:.3f} | {r['fd_class']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['coverage']:.3f} | {r['acc']:.3f} | {r['images_per_s']:.1f} |")
    f = result["floor"]
    lines.append(f"| real data (train vs test) | - | {f['fd']:.3f} | {f['fd_class']:.2f} | {f['precision']:.3f} | "
                 f"{f['recall']:.3f} | {f['coverage']:.3f} | - | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
