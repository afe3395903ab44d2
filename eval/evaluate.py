"""``fastgen eval``: generate with a pipeline, score the images, write metrics.json, a table and a grid.

Metrics (``--metrics``, comma-separated; docs/evaluation.md says what each measures):

* ``fd``, ``kid`` -- domain Fréchet distance and KID on the zoo classifier's features against the
  real test split.
* ``fd_class`` -- per-class FD: the mean over classes of the FD between the generated images of a
  prompted class and the real test images of that class (class-prompted pipelines: fmnist-ldm).
* ``fd_pixel`` -- FD on the pixels' leading principal components (features that are no classifier's).
* ``precision``, ``recall``, ``density``, ``coverage`` -- Kynkäänniemi et al. 2019 and Naeem et al.
  2020 (k = 5) on the classifier's features, against a real test subset of the same size.
* ``fd_groups`` -- the FD of each feature group of the classifier alone, and of all groups together
  (a diagnostic, not default).
* ``acc`` -- prompt adherence: the classifier's accuracy on the prompted classes (fmnist-ldm).
* ``fid`` -- clean-fid FID (Inception) against ``--fid-reference`` (folder, dataset name or stats file).
* ``clip`` -- CLIP score through open_clip (``--clip-model`` / ``--clip-pretrained``).
* ``speed`` -- images/s, seconds per image, NFE, peak memory.

Every domain metric is reported with its real-data floor (``<name>_floor``): the same metric for
real train images against the real test split, at the same N and the same images per class.
"""

from __future__ import annotations

import functools
import inspect
import json
import statistics
import sys
from pathlib import Path

import torch

from fastgen import zoo
from fastgen.pipelines.folders import check_output_dir
from fastgen.pipelines.images import save_grid
from fastgen.pipelines.prompts import load_prompts
from fastgen.pipelines.export import pipeline_metadata, use_trained_resolution
from fastgen.pipelines.sampler import check_gamma
from fastgen.schedule import check_timesteps, is_flow_config

from .generate import (SOLVERS, Generated, check_generation, generate, load_pipeline, solver_scheduler,
                       tcd_scheduler, timesteps_scheduler, zoo_name_of)
from .speed import PeakMemory, speed_row

# Metrics scored with the zoo's data (real test split) and domain classifiers; each has a real-data floor.
DOMAIN_METRICS = ("fd", "kid", "fd_class", "fd_pixel", "precision", "recall", "density", "coverage", "fd_groups",
                  "acc")
METRICS = (*DOMAIN_METRICS, "fid", "clip", "speed")
DEFAULT_METRICS = ("fd", "kid", "fd_class", "fd_pixel", "precision", "recall", "density", "coverage", "acc", "speed")
# What training-time evaluation (``train.eval_every``) computes and returns: quality and diversity
# at the cost of one classifier pass, a k-NN search and a PCA projection of a few hundred images.
# ``fd_class`` and ``acc`` need a class-prompted teacher; evaluate() skips them for unconditional ones.
TRAINING_METRICS = ("fd", "fd_class", "fd_pixel", "precision", "recall", "coverage", "acc")
# Result keys of ``fd_groups``, one per feature group of the classifier.
GROUP_KEY = "fd_group_{}"


def parse_metrics(text: str | list[str] | tuple) -> list[str]:
    """The metric names of a comma-separated string or a list; ``ValueError`` naming the valid ones otherwise."""
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in items if m not in METRICS]
    if unknown or not items:
        raise ValueError(f"Unknown metric(s) {unknown or text!r}; choose from {', '.join(METRICS)}.")
    return items


def check_counts(metrics: list[str], num_images: int, num_classes: int | None, flag: str = "--num-images") -> None:
    """Raise a one-line ``ValueError`` before generating when ``num_images`` is too few for ``metrics``.

    Args:
        metrics: parsed metric names.
        num_images: images to be generated.
        num_classes: prompted classes the images cycle through (``None``: unconditional pipeline).
        flag: the option that set ``num_images``, named in the message.
    """
    from .metrics import MIN_IMAGES_FD

    needs_n = [m for m in metrics if (m in DOMAIN_METRICS and m not in ("acc", "fd_class")) or m == "fid"]
    if needs_n and num_images < MIN_IMAGES_FD:
        raise ValueError(f"{', '.join(needs_n)}: at least {MIN_IMAGES_FD} images needed, got {flag} {num_images}.")
    if "fd_class" in metrics and num_classes and num_images < MIN_IMAGES_FD * num_classes:
        leave = "or leave fd_class out of --metrics" if flag == "--num-images" else "the class FD needs them"
        raise ValueError(f"fd_class needs at least {MIN_IMAGES_FD} images per class: {flag} "
                         f"{MIN_IMAGES_FD * num_classes} or more for {num_classes} classes (got {num_images}); {leave}.")


def check_domain(metrics: list[str], zoo_name: str | None) -> None:
    """Raise a one-line ``ValueError`` when ``metrics`` ask for domain metrics of a pipeline outside the zoo.

    Args:
        metrics: parsed metric names.
        zoo_name: the zoo teacher the pipeline is (or was distilled from), ``None`` for others.
    """
    domain = [m for m in metrics if m in DOMAIN_METRICS]
    if domain and zoo_name is None:
        raise ValueError(f"{', '.join(domain)} use the zoo's data and domain classifiers: evaluate a zoo teacher or a "
                         "student of one, or use --metrics fid,clip,speed for other pipelines.")


def available_metrics(metrics: list[str], zoo_name: str | None) -> list[str]:
    """``metrics`` without the domain metrics for a pipeline outside the zoo (they need the zoo's data and domain
    classifiers), said once; a one-line ``ValueError`` when nothing is left to score.

    Args:
        metrics: parsed metric names.
        zoo_name: the zoo teacher the pipeline is (or was distilled from), ``None`` for others.
    """
    domain = [m for m in metrics if m in DOMAIN_METRICS]
    if not domain or zoo_name is not None:
        return list(metrics)
    rest = [m for m in metrics if m not in DOMAIN_METRICS]
    if not rest:
        check_domain(domain, zoo_name)
    print(f"note: {', '.join(domain)} skipped: they use the zoo's data and domain classifiers, and this pipeline is "
          f"neither a zoo teacher nor a student of one; scoring {', '.join(rest)} (fid needs --fid-reference, clip "
          "the CLIP weights).")
    return rest


def check_prompt_source(pipe, prompt_list: list[str] | None, zoo_name: str | None) -> None:
    """One-line errors for ``--prompts`` given to an unconditional pipeline, or missing for a text-to-image pipeline
    outside the zoo (the zoo's ten Fashion-MNIST class prompts would be scored silently)."""
    text = hasattr(pipe, "encode_prompt")
    if prompt_list is not None and not text:
        raise ValueError(f"--prompts: {type(pipe).__name__} is unconditional; it takes no prompts.")
    if text and prompt_list is None and zoo_name is None:
        raise ValueError(f"--prompts: {type(pipe).__name__} is text-to-image and neither a zoo teacher nor a student "
                         "of one: give --prompts FILE (one prompt per line) to generate and score with.")


def check_fid_reference(metrics: list[str], fid_reference) -> None:
    """One-line errors for ``fid`` without a reference, or with a reference or Inception weights that are missing
    (each naming the file and where to put it), before any image is generated."""
    from .metrics import check_fid, parse_fid_reference

    if "fid" not in metrics:
        return
    if fid_reference is None:
        raise ValueError("--metrics fid needs --fid-reference (an image folder, a .npz statistics file or a "
                         "clean-fid dataset as NAME:RES[:SPLIT] or NAME:custom).")
    check_fid(*parse_fid_reference(fid_reference))


def domain_scores(images: torch.Tensor, labels, zoo_name: str, metrics) -> dict:
    """The :data:`DOMAIN_METRICS` among ``metrics`` for images of a zoo domain, against its real test split.

    ``fd_class`` and ``acc`` are left out when ``labels`` is ``None`` (unconditional pipelines).

    Args:
        images: ``[N, C, S, S]`` in [0, 1].
        labels: the prompted class of each image, or ``None``.
        zoo_name: the zoo teacher (or classifier) name of the domain.
        metrics: metric names.
    """
    from .diversity import PRDC_KEYS, class_fd_from_images, fd_groups_from_images, pixel_fd_from_images, \
        prdc_from_images
    from .metrics import fd_kid_from_images, prompt_accuracy

    result: dict = {}
    if "fd" in metrics or "kid" in metrics:
        out = fd_kid_from_images(images, zoo_name, compute_kid="kid" in metrics)
        result["fd"] = out["fd"]
        if "kid" in metrics:
            result["kid"] = out["kid"]
    if "fd_class" in metrics and labels is not None:
        result.update(class_fd_from_images(images, labels, zoo_name))
    if "fd_pixel" in metrics:
        result["fd_pixel"] = pixel_fd_from_images(images, zoo_name)
    if set(PRDC_KEYS) & set(metrics):
        out = prdc_from_images(images, zoo_name)
        result.update({key: out[key] for key in PRDC_KEYS if key in metrics}, n_prdc=out["n_prdc"])
    if "fd_groups" in metrics:
        by_group = fd_groups_from_images(images, zoo_name)
        result.update({GROUP_KEY.format(group): value for group, value in by_group.items()})
    if "acc" in metrics and labels is not None:
        result["acc"] = prompt_accuracy(images, labels, zoo_name)
    return result


@functools.lru_cache(maxsize=16)
def _real_floor(zoo_name: str, num_images: int, labels: tuple | None, metrics: tuple) -> dict:
    from .classifiers import real_images, real_images_of_classes

    if labels is None:
        n = min(num_images, len(real_images(zoo_name, "train")))
        images = real_images(zoo_name, "train", n=n, seed=1)
    else:
        images = real_images_of_classes(zoo_name, labels, "train", seed=1)
    return domain_scores(images, labels, zoo_name, metrics)


def real_floor(zoo_name: str, num_images: int, metrics=DEFAULT_METRICS, labels=None) -> dict:
    """The domain metrics of real train images against the real test split: what a perfect generator scores.

    The same computation as for generated images (:func:`domain_scores`) at the same sample size
    and, with ``labels``, the same classes in the same order (so ``fd_class`` compares per-class
    sets of equal size). Prompt accuracy has no floor (the classifier was trained on these images).
    Cached per process.

    Args:
        zoo_name: the zoo teacher (or classifier) name.
        num_images: sample size (capped at the size of the train split); ignored with ``labels``.
        metrics: metric names; those outside :data:`DOMAIN_METRICS` and ``acc`` are ignored.
        labels: the prompted classes of the generated images, or ``None`` (unconditional).
    """
    metrics = tuple(m for m in metrics if m in DOMAIN_METRICS and m != "acc")
    labels = None if labels is None else tuple(int(c) for c in torch.as_tensor(labels).flatten().tolist())
    return _real_floor(zoo_name, num_images, labels, metrics)


def score(gen: Generated, zoo_name: str | None, metrics: list[str], fid_reference=None,
          clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai", clip=None) -> dict:
    """The requested metrics of generated images with the domain metrics' floors (speed is added by the caller).
    ``clip``: an already loaded ``(model, preprocess, tokenizer)`` (:func:`~.metrics.load_clip`)."""
    from .metrics import clean_fid, clip_score, parse_fid_reference

    result: dict = {}
    check_domain(metrics, zoo_name)
    domain = [m for m in metrics if m in DOMAIN_METRICS]
    if domain:
        result.update(domain_scores(gen.images, gen.labels, zoo_name, domain))
        floor = real_floor(zoo_name, len(gen.images), domain, gen.labels)
        result.update({f"{key}_floor": value for key, value in floor.items()
                       if key in result and not key.startswith("n_") and key != "fd_by_class"})
    if "fid" in metrics:
        reference, dataset_res, dataset_split = parse_fid_reference(fid_reference)
        result["fid"] = clean_fid(gen.images, reference, dataset_res, dataset_split)
    if "clip" in metrics:
        if gen.prompts is None:
            raise ValueError("--metrics clip needs a text-to-image pipeline.")
        model, preprocess, tokenizer = clip or (None, None, None)
        result["clip"] = clip_score(gen.images, gen.prompts, clip_model, clip_pretrained, model=model,
                                    preprocess=preprocess, tokenizer=tokenizer)
    return result


def run_one(pipe, zoo_name, metrics, num_images, steps=None, timesteps=None, guidance=None, seed=0,
            batch_size=100, device="cpu", progress=True, prompts=None, eta=None,
            **score_kwargs) -> tuple[dict, Generated]:
    """Generate (timed, peak memory) and score one configuration (``prompts``: ``None`` for the zoo's class
    prompts, whose labels the class metrics need; ``eta``: the scheduler's, e.g. TCD's gamma)."""
    with PeakMemory(device) as mem:
        gen = generate(pipe, num_images, steps, timesteps, guidance, prompts=prompts, batch_size=batch_size,
                       seed=seed, progress=progress, eta=eta)
    row = score(gen, zoo_name, metrics, **score_kwargs)
    if "speed" in metrics:  # without the first (warm-up) pipeline call when there are several
        timed_images, timed_seconds = gen.timed()
        row.update(speed_row(timed_images, timed_seconds, gen.nfe, mem.peak_mb), speed_images=timed_images)
    row["nfe"] = gen.nfe
    return row, gen


def check_seeds(seed: int, seeds) -> list[int]:
    """The evaluation seeds: ``[seed]``, or ``seeds`` (two or more distinct whole numbers >= 0; ``seed`` left at its
    default 0); a one-line ``ValueError`` naming ``--seeds`` otherwise."""
    if seeds is None:
        return [seed]
    seeds = list(seeds)
    if len(seeds) < 2 or len(set(seeds)) < len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"--seeds expects two or more distinct whole numbers >= 0, e.g. 0,1,2,3,4; got {seeds}.")
    if seed != 0:
        raise ValueError(f"--seed {seed} and --seeds {','.join(map(str, seeds))}: give one of them.")
    return seeds


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_over_seeds(rows: list[dict]) -> tuple[dict, dict]:
    """The mean and the sample standard deviation of each numeric metric over the rows of several evaluation seeds
    (per-class dicts such as ``fd_by_class`` averaged per class; anything else taken from the first row).

    Returns:
        ``(mean, sd)``: the first has every key of ``rows[0]``, the second only the numeric ones.
    """
    mean, sd = {}, {}
    for key, first in rows[0].items():
        values = [row.get(key) for row in rows]
        if all(_is_number(v) for v in values):  # equal values (nfe, the floors) kept as they are
            same = all(v == first for v in values)
            mean[key], sd[key] = (first, 0.0) if same else (statistics.fmean(values), statistics.stdev(values))
        elif all(isinstance(v, dict) for v in values) and all(_is_number(x) for v in values for x in v.values()):
            mean[key] = {k: statistics.fmean(v[k] for v in values) for k in first}
        else:
            mean[key] = first
    return mean, sd


def student_call(pipe) -> dict:
    """``{"steps"|"timesteps", "guidance"}`` from an exported student's fastgen metadata ({} for others)."""
    meta = pipeline_metadata(pipe)
    if not meta:
        return {}
    call = {"guidance": meta.get("guidance_scale")}
    if "timesteps=" in meta.get("call", "") or "sigmas=" in meta.get("call", ""):  # flow: sigmas = timesteps / T
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


def check_eta(eta) -> float:
    """A one-line ``ValueError`` unless ``eta`` (DDIM's stochasticity) lies in [0, 1]."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"--eta (DDIM's stochasticity) must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's "
                         f"variance), got {eta!r}.")
    return float(eta)


def evaluate(target: str, steps: int | None = None, timesteps: list | None = None,
             guidance: float | None = None, num_images: int = 1000, metrics=DEFAULT_METRICS,
             out: str | Path | None = None, solver: str | None = None, batch_size: int = 100, seed: int = 0,
             fid_reference=None, clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai",
             device: str = "cpu", progress: bool = True, allow_pickle: bool = False, prompts=None,
             grid: str | Path | None = None, gamma: float | None = None, loading=None,
             seeds: list[int] | None = None, eta: float | None = None) -> dict:
    """Evaluate one pipeline (zoo name, folder or hub id) and write ``metrics.json``, ``metrics.md``, ``samples.png``.

    Args:
        target: what to evaluate; an exported student is called as its metadata says unless
            ``steps`` / ``timesteps`` / ``guidance`` override it.
        steps, timesteps: step count or explicit timesteps (one of them; required for teachers). Timesteps are
            whole numbers in [0, T-1] for DDPM-family (VP) pipelines, ``t = sigma T`` in (0, T] for flow ones
            (SD3, Flux: any numbers, e.g. ``[1000.0, 662.7]``, passed to their call as ``sigmas = t / T``).
        guidance: classifier-free guidance scale (default: the student's, or the zoo teacher's recommended).
        num_images: images to generate (FD/KID need at least 10, fd_class 10 per class; use >= 1000 for
            stable numbers).
        metrics: subset of :data:`METRICS`.
        out: output folder (default: no files).
        solver: replace the pipeline's scheduler by a training-free solver (ddim, dpm++2m, unipc, euler).
            With ``timesteps``, a scheduler that takes them (:func:`~.generate.timesteps_scheduler`: DDIM runs
            as first-order DPM-Solver++).
        allow_pickle: let the pipeline load pickled (``.bin``) weights where it has no safetensors.
        prompts: what text-to-image pipelines are prompted with, cycled: ``None`` or ``"zoo"`` (the zoo's class
            prompts), a text file with one prompt per line, or a list. With other prompts than the zoo's the
            class metrics (``fd_class``, ``acc``) are left out.
        grid: also (or, without ``out``, only) write the sample grid (up to 100 images) to this PNG file.
        gamma: sample with diffusers' ``TCDScheduler`` (strategic stochastic sampling, Zheng et al. 2024) at this
            gamma in [0, 1], passed as the call's ``eta``: an inference option of consistency students (VP).
        loading: how the pipeline is loaded (:class:`~fastgen.pipelines.loading.LoadOptions`: dtype, variant,
            revision, replaced components, single-file config, attention).
        seeds: evaluate with each of these seeds (``num_images`` each, one pipeline load) instead of ``seed``:
            ``metrics`` is then the mean over them, ``metrics_sd`` the sample standard deviation and
            ``metrics_by_seed`` each seed's row; the grid shows the first seed's images. At a few thousand images
            an FD moves with the seed alone (docs/evaluation.md): compare samplers by the mean.
        eta: DDIM's stochasticity in [0, 1] (Song et al. 2021; 0: deterministic DDIM, 1: DDPM's posterior
            variance), passed as the call's ``eta`` to a scheduler whose ``step`` takes it (``DDIMScheduler``: the
            exported folder of a progressive student, or ``solver="ddim"``): an inference option of DDIM students.

    Bad input (including missing FID / CLIP weights and an unwritable ``out``) is a one-line error raised
    before the first image is generated.
    """
    from .metrics import load_clip

    # every check that needs no pipeline first, then those that need it: all before the first image
    metrics = parse_metrics(metrics)
    seed_list = check_seeds(seed, seeds)
    check_counts(metrics, num_images, None)
    check_generation(num_images, steps, timesteps, guidance, batch_size)
    if solver is not None and solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; available: {', '.join(SOLVERS)}.")
    if gamma is not None:
        check_gamma(gamma)
        if solver is not None:
            raise ValueError(f"--gamma samples with TCDScheduler and --solver with {solver}: give one of them.")
    if eta is not None:
        check_eta(eta)
        if gamma is not None:
            raise ValueError("--eta is DDIM's stochasticity and --gamma TCD's (its own eta): give one of them.")
    prompt_list = None if prompts is None or prompts == "zoo" else load_prompts(prompts)
    if out is not None:
        out = check_output_dir(out)
    check_fid_reference(metrics, fid_reference)
    pipe = load_pipeline(target, device if device != "cpu" else None, allow_pickle=allow_pickle, options=loading)
    use_trained_resolution(pipe, pipeline_metadata(pipe))  # a Flux student's call defaults to 128 latents otherwise
    flow = is_flow_config({"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)})
    zoo_name = zoo_name_of(pipe, target)
    metrics = available_metrics(metrics, zoo_name)
    text = hasattr(pipe, "encode_prompt")
    check_prompt_source(pipe, prompt_list, zoo_name)
    check_counts(metrics, num_images, len(zoo.prompts()) if text and prompt_list is None else None)
    if "clip" in metrics and not text:
        raise ValueError("--metrics clip needs a text-to-image pipeline.")
    clip = load_clip(clip_model, clip_pretrained, device) if "clip" in metrics else None
    call = student_call(pipe)
    if solver:
        pipe.scheduler = solver_scheduler(solver, pipe.scheduler.config)
    if gamma is not None:
        pipe.scheduler = tcd_scheduler(pipe.scheduler)
    steps = steps if steps is not None or timesteps else call.get("steps")
    timesteps = timesteps or (call.get("timesteps") if steps is None else None)
    if steps is None and not timesteps:
        raise ValueError(f"{target} is not a fastgen student: give --steps or --timesteps.")
    if timesteps:
        try:
            check_timesteps(timesteps, pipe.scheduler.config.get("num_train_timesteps", 1000), continuous=flow)
        except ValueError as err:
            raise ValueError(f"--timesteps {list(timesteps)}: {err}") from None
        pipe.scheduler = timesteps_scheduler(pipe.scheduler, solver)
    if eta is not None and "eta" not in inspect.signature(pipe.scheduler.step).parameters:
        raise ValueError(f"--eta: {type(pipe.scheduler).__name__}.step takes no eta; DDIMScheduler does (a progressive "
                         "student's folder, or --solver ddim without --timesteps).")
    if guidance is None:
        guidance = call.get("guidance", zoo.RECOMMENDED_GUIDANCE.get(zoo_name) if zoo_name else None)
    rows, gen = [], None
    for i, s in enumerate(seed_list):
        if progress and len(seed_list) > 1:
            print(f"evaluation seed {s} ({i + 1} of {len(seed_list)})", file=sys.stderr)
        row, generated = run_one(pipe, zoo_name, metrics, num_images, steps, timesteps, guidance, s, batch_size,
                                 device, progress, prompts=prompt_list, eta=gamma if gamma is not None else eta,
                                 fid_reference=fid_reference, clip=clip)
        rows.append(row)
        gen = gen or generated  # the first seed's images make the grid
    result = {"target": target, "zoo": zoo_name, "solver": solver, "scheduler": type(pipe.scheduler).__name__,
              "gamma": gamma, "eta": eta, "call": {k: v for k, v in gen.call.items()}, "guidance": guidance,
              "num_images": num_images,
              "seed": seed_list[0] if len(seed_list) == 1 else None, "seeds": seed_list,
              "threads": torch.get_num_threads(), "metrics": rows[0]}
    if len(seed_list) > 1:
        result["metrics"], result["metrics_sd"] = mean_over_seeds(rows)
        result["metrics_by_seed"] = rows
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        (out / "metrics.md").write_text(metrics_markdown(result))
    for path in ([out / "samples.png"] if out is not None else []) + ([Path(grid)] if grid is not None else []):
        save_grid(gen.images[:100], path, nrow=10, scale=4 if gen.images.shape[-1] <= 32 else 1)
    return result


# Row order of the metrics table: the domain metrics, the FD of each feature group (fd_groups), the rest.
DOMAIN_TABLE_KEYS = ("fd", "kid", "fd_class", "fd_pixel", "precision", "recall", "density", "coverage")
OTHER_TABLE_KEYS = ("acc", "fid", "clip", "images_per_s", "s_per_image", "nfe", "peak_memory_mb")


def metrics_markdown(result: dict) -> str:
    """The metrics of one :func:`evaluate` result as a Markdown table with the real-data floors (with several
    evaluation seeds: the mean +- sample sd, then each seed's value)."""
    m = result["metrics"]
    seeds = result.get("seeds") or [result["seed"]]
    by_seed = result.get("metrics_by_seed", [])
    if by_seed:
        seed_text = f"seeds {', '.join(map(str, seeds))} ({result['num_images']} images each)"
        header = ["| metric | mean +- sd | " + " | ".join(f"seed {s}" for s in seeds) + " | real-data floor |",
                  "|---|---:|" + "---:|" * len(seeds) + "---:|"]
    else:
        seed_text = f"{result['num_images']} images, seed {seeds[0]}"
        header = ["| metric | value | real-data floor |", "|---|---:|---:|"]
    lines = [f"# fastgen eval: {result['target']}", "",
             f"call: `{result['call']}`, guidance {result['guidance']}, {seed_text}, {result['threads']} CPU threads",
             "", *header]
    groups = [key for key in m if key.startswith(GROUP_KEY.format("")) and not key.endswith("_floor")]
    keys = (*DOMAIN_TABLE_KEYS, *groups, *OTHER_TABLE_KEYS)
    for key in keys:
        if key not in m:
            continue
        if by_seed:
            sd = result["metrics_sd"].get(key)
            value = fmt(m[key], 4) + (f" +- {fmt(sd, 4)}" if sd else "")  # no sd where the seed changes nothing
            value += " | " + " | ".join(fmt(row.get(key), 4) for row in by_seed)
        else:
            value = fmt(m[key], 4)
        lines.append(f"| {key} | {value} | {fmt(m.get(key + '_floor'), 4)} |")
    return "\n".join(lines) + "\n"


def training_evaluator(folder: str, num_images: int, device: str = "cpu", grid: str | Path | None = None) -> dict:
    """:data:`TRAINING_METRICS` of an exported student folder (``train.eval_every``), and its sample grid written
    to ``grid``; the class metrics are left out for unconditional pipelines."""
    result = evaluate(folder, num_images=num_images, metrics=TRAINING_METRICS, progress=False, device=device,
                      grid=grid)
    return {k: v for k, v in result["metrics"].items() if k in TRAINING_METRICS}


def check_training_evaluation(num_images: int, text: bool) -> None:
    """What :func:`training_evaluator` would refuse at the run's first evaluation, refused before training (and
    before its data, such as teacher ODE pairs, is made): too few ``train.eval_images`` for its metrics.

    Args:
        num_images: ``train.eval_images``.
        text: whether the teacher is text-to-image (its students are scored per zoo class prompt).
    """
    check_counts(list(TRAINING_METRICS), num_images, len(zoo.prompts()) if text else None, "train.eval_images =")


training_evaluator.check = check_training_evaluation  # the runner calls it before any long work
