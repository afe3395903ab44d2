"""``fastgen bench``: the quality-vs-NFE frontier of a teacher and its students.

For the teacher: each training-free solver (DDIM, DPM-Solver++ 2M, UniPC, Euler) at NFE 1, 2, 4,
8, 16 and 50, through the teacher's own pipeline with the scheduler swapped. For each student:
its own call. Every row is generated from the same seed and prompts and scored with the same
metrics; speed-up is against the teacher's DDIM at 50 steps measured in the same run.
Writes ``bench.json``, ``bench.md`` (one table) and ``bench.png`` (FD against NFE, log scale).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastgen import zoo

from .evaluate import fmt, real_floor, run_one, student_call
from .generate import SOLVERS, load_pipeline, solver_scheduler, zoo_name_of

NFES = (1, 2, 4, 8, 16, 50)


def bench(teacher: str, students: list[str] = (), solvers=tuple(SOLVERS), nfes=NFES, num_images: int = 1000,
          guidance: float | None = None, out: str | Path = "bench", seed: int = 0, batch_size: int = 200,
          progress: bool = True) -> dict:
    """Run the frontier and write its table and plot.

    Args:
        teacher: zoo name, folder or hub id of the teacher.
        students: exported student folders.
        solvers: training-free solvers to run on the teacher.
        nfes: step counts of the teacher's solvers.
        num_images: images per row (the same prompts and seed for every row).
        guidance: the teacher's guidance scale (default: the zoo's recommended one).
    """
    from tqdm.auto import tqdm

    pipe = load_pipeline(teacher)
    zoo_name = zoo_name_of(pipe, teacher)
    if zoo_name is None:
        raise ValueError("fastgen bench scores with the zoo's domain classifiers; pass a zoo teacher.")
    text = hasattr(pipe, "encode_prompt")
    metrics = ["fd", "kid", "acc", "speed"] if text else ["fd", "kid", "speed"]
    guidance = guidance if guidance is not None else zoo.RECOMMENDED_GUIDANCE.get(zoo_name)
    base_config = dict(pipe.scheduler.config)
    rows = []
    jobs = [(s, n) for s in solvers for n in nfes]
    for solver, nfe in tqdm(jobs, desc=f"bench {teacher}", disable=not progress):
        pipe.scheduler = solver_scheduler(solver, base_config)
        row, _ = run_one(pipe, zoo_name, metrics, num_images, steps=nfe, guidance=guidance, seed=seed,
                         batch_size=batch_size, progress=False)
        rows.append({"sampler": solver, "kind": "teacher", "guidance": guidance, **row})
    for folder in students:
        student = load_pipeline(folder)
        call = student_call(student)
        if not call:
            raise ValueError(f"{folder} has no fastgen metadata: is it an exported student?")
        row, _ = run_one(student, zoo_name, metrics, num_images, steps=call.get("steps"),
                         timesteps=call.get("timesteps"), guidance=call.get("guidance"), seed=seed,
                         batch_size=batch_size, progress=False)
        meta = dict(student.scheduler.config)["fastgen"]
        rows.append({"sampler": f"{meta['method']} student ({Path(folder).name})", "kind": "student",
                     "guidance": call.get("guidance"), **row})
    baseline = next((r["s_per_image"] for r in rows if r["sampler"] == "ddim" and r["nfe"] == 50), None)
    for r in rows:
        r["speedup"] = baseline / r["s_per_image"] if baseline else None
    floor = real_floor(zoo_name, num_images, True)
    result = {"teacher": teacher, "zoo": zoo_name, "num_images": num_images, "seed": seed, "guidance": guidance,
              "threads": torch.get_num_threads(), "floor": floor, "rows": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(bench_markdown(result))
    plot_frontier(result, out / "bench.png")
    return result


def bench_markdown(result: dict) -> str:
    has_acc = any("acc" in r for r in result["rows"])
    head = "| sampler | NFE | FD | KID | " + ("accuracy | " if has_acc else "") + "images/s | speed-up vs DDIM-50 |"
    lines = [head, "|---|---:|---:|---:|" + ("---:|" if has_acc else "") + "---:|---:|"]
    for r in result["rows"]:
        acc = f" {fmt(r.get('acc'), 3)} |" if has_acc else ""
        lines.append(f"| {r['sampler']} | {r['nfe']} | {fmt(r['fd'], 3)} | {fmt(r['kid'], 4)} |{acc} "
                     f"{fmt(r['images_per_s'], 1)} | {fmt(r['speedup'], 1)}x |")
    f = result["floor"]
    lines.append(f"| real data (train vs test) | - | {fmt(f['fd'], 3)} | {fmt(f['kid'], 4)} |" +
                 (" - |" if has_acc else "") + " - | - |")
    return "\n".join(lines) + "\n"


def plot_frontier(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    teacher_rows = [r for r in result["rows"] if r["kind"] == "teacher"]
    for solver in dict.fromkeys(r["sampler"] for r in teacher_rows):
        pts = sorted((r["nfe"], r["fd"]) for r in teacher_rows if r["sampler"] == solver)
        ax.plot(*zip(*pts), marker="o", label=f"teacher, {solver}")
    for r in result["rows"]:
        if r["kind"] == "student":
            ax.scatter([r["nfe"]], [r["fd"]], marker="*", s=160, zorder=5, label=r["sampler"])
    ax.axhline(result["floor"]["fd"], color="grey", ls="--", lw=1, label="real data floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per image; a CFG pair counts once)")
    ax.set_ylabel("domain FD (lower is better)")
    ax.set_title(f"{result['teacher']}: quality vs NFE ({result['num_images']} images)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
