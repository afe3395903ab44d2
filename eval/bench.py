"""``fastgen bench``: the quality-vs-NFE frontier of a teacher and its students.

For the teacher: each training-free solver (DDIM, DPM-Solver++ 2M, UniPC, Euler) at NFE 1, 2, 4,
8, 16 and 50, through the teacher's own pipeline with the scheduler swapped. For each student:
its own call. Every row is generated from the same seed and prompts and scored with the same
metrics; speed-up is against the teacher's DDIM at 50 steps measured in the same run.
Writes ``bench.json``, ``bench.md`` (one table) and ``bench.png`` (two panels against NFE, log
scale: FD, and recall -- the diversity FD can miss).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastgen import zoo
from fastgen.pipelines.folders import check_output_dir
from fastgen.pipelines.loading import LoadOptions
from fastgen.pipelines.prompts import load_prompts
from fastgen.schedule import is_flow_config

from .evaluate import (DEFAULT_METRICS, available_metrics, check_counts, check_fid_reference, check_prompt_source,
                       fmt, parse_metrics, real_floor, run_one, student_call)
from .generate import SOLVERS, check_generation, default_solvers, load_pipeline, solver_scheduler, zoo_name_of

NFES = (1, 2, 4, 8, 16, 50)


def bench(teacher: str, students: list[str] = (), solvers=None, nfes=NFES, num_images: int = 1000,
          guidance: float | None = None, out: str | Path = "bench", seed: int = 0, batch_size: int = 200,
          progress: bool = True, allow_pickle: bool = False, device: str = "cpu", prompts=None, metrics=None,
          fid_reference=None, clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai",
          loading=None, resolution: int | None = None) -> dict:
    """Run the frontier and write its table and plot.

    Args:
        teacher: zoo name, folder or hub id of the teacher (any diffusers pipeline: the domain metrics are
            scored for zoo teachers only and skipped, said once, for others).
        metrics: metric names (default: :data:`~.evaluate.DEFAULT_METRICS`, plus ``fid`` with ``fid_reference``).
        fid_reference, clip_model, clip_pretrained: as in :func:`~.evaluate.evaluate`.
        loading: how the teacher is loaded (:class:`~fastgen.pipelines.loading.LoadOptions`); the students are
            loaded with its dtype and attention.
        students: exported student folders.
        solvers: training-free solvers to run on the teacher (default: :func:`default_solvers`: all four, or
            euler, dpm++2m and unipc for a flow teacher, where DDIM is Euler).
        nfes: step counts of the teacher's solvers.
        num_images: images per row (the same prompts and seed for every row).
        guidance: the teacher's guidance scale (default: the zoo's recommended one).
        allow_pickle: let the pipelines load pickled (``.bin``) weights where they have no safetensors.
        device: torch device of the pipelines (``"cpu"``, ``"cuda"``, ...).
        prompts: ``None`` or ``"zoo"`` (the zoo's class prompts), a text file or a list (text-to-image teachers;
            the class metrics are then left out).
        resolution: image height = width in pixels of every row, for pipelines whose call defaults to
            ``default_sample_size`` (SDXL, SD3, Flux; others refuse it). Default: the students' trained resolution
            (``fastgen.json``), so the teacher's solvers run at the students' size; without students, the
            teacher pipeline's default.

    Bad input is a one-line error raised before the first image is generated.
    """
    from tqdm.auto import tqdm

    from fastgen.pipelines.export import (pipeline_metadata, read_metadata, set_default_resolution,
                                          use_trained_resolution)

    from .metrics import load_clip

    # every check before the first image: solvers, step counts, the call, the output folder, the students
    nfes = list(nfes)
    unknown = [s for s in solvers if s not in SOLVERS] if solvers is not None else []
    if unknown or solvers is not None and not solvers:
        raise ValueError(f"--solvers: unknown solver(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"available: {', '.join(SOLVERS)}.")
    if not nfes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in nfes):
        raise ValueError(f"--nfes must be positive step counts, got {nfes}.")
    # fd_class and acc are skipped for unconditional teachers, the domain metrics for teachers outside the zoo
    metrics = parse_metrics(metrics or [*DEFAULT_METRICS, *(["fid"] if fid_reference is not None else [])])
    check_counts(metrics, num_images, None)
    check_fid_reference(metrics, fid_reference)
    check_generation(num_images, None, None, guidance, batch_size)
    prompt_list = None if prompts is None or prompts == "zoo" else load_prompts(prompts)
    out = check_output_dir(out)
    for folder in students:
        if not read_metadata(folder):
            raise ValueError(f"--students {folder} has no fastgen metadata: is it an exported student?")
    resolution = bench_resolution(resolution, {folder: read_metadata(folder) for folder in students})
    pipe = load_pipeline(teacher, device if device != "cpu" else None, allow_pickle=allow_pickle, options=loading)
    if resolution is not None:  # the teacher's rows at the students' size (Flux's call defaults to 128 latents)
        set_default_resolution(pipe, resolution, "--resolution")
    student_loading = LoadOptions(dtype=loading.dtype, attention=loading.attention) if loading else None
    zoo_name = zoo_name_of(pipe, teacher)
    metrics = available_metrics(metrics, zoo_name)
    if "speed" not in metrics:
        metrics.append("speed")  # the table's images/s and speed-up
    text = hasattr(pipe, "encode_prompt")
    check_prompt_source(pipe, prompt_list, zoo_name)
    if "clip" in metrics and not text:
        raise ValueError("--metrics clip needs a text-to-image pipeline.")
    clip = load_clip(clip_model, clip_pretrained, device) if "clip" in metrics else None
    scoring = {"fid_reference": fid_reference, "clip": clip}
    labels = torch.arange(num_images) % len(zoo.prompts()) if text and prompt_list is None else None
    check_counts(metrics, num_images, len(zoo.prompts()) if labels is not None else None)
    guidance = guidance if guidance is not None else zoo.RECOMMENDED_GUIDANCE.get(zoo_name or "")
    base_config = dict(pipe.scheduler.config)
    solvers = list(solvers) if solvers is not None else default_solvers(base_config)
    baseline_solver = "euler" if is_flow_config(base_config) else "ddim"  # DDIM-50 (on a flow teacher: Euler)
    rows = []
    jobs = [(s, n) for s in solvers for n in nfes]
    for solver, nfe in tqdm(jobs, desc=f"bench {teacher}", disable=not progress):
        pipe.scheduler = solver_scheduler(solver, base_config)
        row, _ = run_one(pipe, zoo_name, metrics, num_images, steps=nfe, guidance=guidance, seed=seed,
                         batch_size=batch_size, device=device, progress=False, prompts=prompt_list, **scoring)
        rows.append({"sampler": solver, "kind": "teacher", "guidance": guidance, **row})
    for folder in students:
        student = load_pipeline(folder, device if device != "cpu" else None, allow_pickle=allow_pickle,
                                options=student_loading)
        meta = pipeline_metadata(student)
        use_trained_resolution(student, meta)  # a Flux student's call defaults to 128 latents otherwise
        if resolution is not None:  # the rows' size (a student's recorded one is that size: bench_resolution)
            set_default_resolution(student, resolution, "--resolution")
        call = student_call(student)
        row, _ = run_one(student, zoo_name, metrics, num_images, steps=call.get("steps"),
                         timesteps=call.get("timesteps"), guidance=call.get("guidance"), seed=seed,
                         batch_size=batch_size, device=device, progress=False, prompts=prompt_list, **scoring)
        rows.append({"sampler": f"{meta['method']} student ({Path(folder).name})", "kind": "student",
                     "guidance": call.get("guidance"), **row})
    baseline = next((r["s_per_image"] for r in rows if r["sampler"] == baseline_solver and r["nfe"] == 50), None)
    for r in rows:
        r["speedup"] = baseline / r["s_per_image"] if baseline else None
    # the rows' prompts cycle through the classes (fastgen.eval.generate): the floor has the same classes
    floor = real_floor(zoo_name, num_images, metrics, labels) if zoo_name is not None else {}
    result = {"teacher": teacher, "zoo": zoo_name, "num_images": num_images, "seed": seed, "guidance": guidance,
              "resolution": resolution, "threads": torch.get_num_threads(), "floor": floor, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(bench_markdown(result))
    plot_frontier(result, out / "bench.png")
    return result


def bench_resolution(resolution: int | None, students: dict[str, dict]) -> int | None:
    """The image size (pixels) every row runs at: ``resolution`` (``--resolution``), else the trained resolution
    the students' metadata record (``students``: folder -> its ``fastgen.json``), else ``None`` (the teacher
    pipeline's default). A one-line ``ValueError`` when students were trained at other sizes than the rows',
    which the table could not compare."""
    from fastgen.pipelines.export import trained_resolution

    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < 1):
        raise ValueError(f"--resolution must be a positive whole number of pixels, got {resolution!r}.")
    trained = {folder: trained_resolution(meta) for folder, meta in students.items()}
    sizes = sorted({size for size in trained.values() if size is not None})
    if resolution is None and len(sizes) > 1:
        raise ValueError(f"--students were trained at different resolutions ({', '.join(map(str, sizes))} pixels): "
                         "bench compares rows at one size; bench them separately.")
    chosen = resolution if resolution is not None else (sizes[0] if sizes else None)
    other = [f"{folder} ({size})" for folder, size in trained.items() if size is not None and size != chosen]
    if other:
        raise ValueError(f"--resolution {chosen}: student(s) {', '.join(other)} were trained at another resolution; "
                         "bench compares rows at one size: leave --resolution out (the students' size) or bench "
                         "them separately.")
    return chosen


# Columns of the bench table: (result key, header, digits); a column shows only when some row has it.
COLUMNS = (("fd", "FD", 3), ("kid", "KID", 4), ("fd_class", "per-class FD", 2), ("fd_pixel", "pixel FD", 2),
           ("precision", "precision", 3), ("recall", "recall", 3), ("density", "density", 3),
           ("coverage", "coverage", 3), ("acc", "accuracy", 3), ("fid", "FID", 2), ("clip", "CLIP score", 4))
# The plot's two panels: the first two of these that the rows have (key, label, log scale), else speed.
PANELS = (("fd", "domain FD (lower is better)", True), ("recall", "recall, k = 5 (higher is better: diversity)", False),
          ("fid", "FID (lower is better)", True), ("clip", "CLIP score (higher is better)", False),
          ("images_per_s", "images/s", True))


def bench_markdown(result: dict) -> str:
    """The bench rows as one Markdown table, the real-data floor last."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in result["rows"])]
    headers = " | ".join(header for _, header, _ in columns)
    lines = [f"| sampler | NFE | {headers} | images/s | speed-up vs DDIM-50 |",
             "|---|---:|" + "---:|" * len(columns) + "---:|---:|"]
    for r in result["rows"]:
        cells = " | ".join(fmt(r.get(key), digits) for key, _, digits in columns)
        lines.append(f"| {r['sampler']} | {r['nfe']} | {cells} | {fmt(r['images_per_s'], 1)} | {fmt(r['speedup'], 1)}x |")
    f = result["floor"]
    cells = " | ".join(fmt(f.get(key), digits) for key, _, digits in columns)
    if f:
        lines.append(f"| real data (train vs test) | - | {cells} | - | - |")
    return "\n".join(lines) + "\n"


def plot_frontier(result: dict, path: Path) -> Path:
    """Two panels against NFE (log scale): FD (log) and recall (teachers outside the zoo: the first two of FID, CLIP
    score and images/s that the rows have), one line per solver, a star per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    teacher_rows = [r for r in result["rows"] if r["kind"] == "teacher"]
    solvers = list(dict.fromkeys(r["sampler"] for r in teacher_rows))
    panels = [p for p in PANELS if all(p[0] in r for r in result["rows"])][:2]
    for ax, (key, label, log_y) in zip(axes, panels):
        for solver in solvers:
            pts = sorted((r["nfe"], r[key]) for r in teacher_rows if r["sampler"] == solver)
            ax.plot(*zip(*pts), marker="o", label=f"teacher, {solver}")
        for r in result["rows"]:
            if r["kind"] == "student":
                ax.scatter([r["nfe"]], [r[key]], marker="*", s=160, zorder=5, label=r["sampler"])
        if key in result["floor"]:
            ax.axhline(result["floor"][key], color="grey", ls="--", lw=1, label="real data (train vs test)")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        elif key == "recall":
            ax.set_ylim(0, 1)
        ax.set_xlabel("NFE (network evaluations per image; a CFG pair counts once)")
        ax.set_ylabel(label)
    if len(panels) < 2:
        axes[1].set_visible(False)
    axes[0].legend(fontsize=7)
    guidance = f", guidance {result['guidance']}" if result.get("guidance") is not None else ""
    fig.suptitle(f"{result['teacher']}: quality and diversity vs NFE ({result['num_images']} images, "
                 f"seed {result['seed']}{guidance})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
