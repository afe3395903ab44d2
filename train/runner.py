"""``fastgen train RECIPE``: from a recipe to an exported student folder, for any registered method.

:func:`run_training` loads the recipe (with ``--set`` overrides) and the teacher pipeline, builds the
recipe's method (:func:`build_method`), the data the method declares it needs (:func:`build_data`) and
the :class:`~fastgen.train.trainer.Trainer` with one optimizer per group the method trains, trains, and
exports the student as the method's :meth:`~fastgen.methods.DistillationMethod.export_spec` says,
through :mod:`fastgen.pipelines`, as a plain diffusers folder (``<out>/student``; LoRA students also as
``<out>/student_lora/pytorch_lora_weights.safetensors``). Nothing here names a method.

Run folder layout: ``recipe.json`` (the resolved recipe; ``fastgen train <out>/recipe.json`` runs it
again), ``teacher.json`` (the teacher's fingerprint, and the ``student.init`` folder's, checked by ``--resume``),
``checkpoints/``, ``logs/`` (trackers; ``trackers.json``: the tracker run a resume continues), ``cache/``
(encoded real images, teacher ODE pairs; safetensors), ``eval.jsonl``, ``samples/`` (the sample grid of each
evaluation), ``train_log.json``, ``resumes.jsonl`` (each ``--resume`` and the recipe keys it changed), ``student/``; for
methods with several rounds also ``rounds/round-<r>/`` (each round's student, exported when the round ends);
``.lock`` (held by the running process, see :class:`~.runfolder.RunFolderLock`). Folders are written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastgen import zoo
from fastgen.lora import AdapterDenoiser, checkpointing_function
from fastgen.pipelines.export import export_student, exported_scheduler, set_default_resolution
from fastgen.pipelines.generate import denoiser_from_pipeline, network_component
from fastgen.pipelines.folders import check_output_dir, check_replaceable, writing_folder
from fastgen.pipelines.loading import LoadOptions, load_pipeline, pipeline_fingerprint
from fastgen.pipelines.lora import fuse_student, save_lora_weights
from fastgen.pipelines.sampler import student_timesteps
from fastgen.schedule import VPSchedule, schedule_timesteps

from .data import BatchStream, PromptBank, load_prompts, load_real, teacher_ode_pairs
from .real_images import RealImageStream
from .recipes import Recipe, build_recipe, describe_options, flatten, load_recipe
from .runfolder import (RECIPE_FILE, RESUMES_FILE, TEACHER_FILE, RunFolderLock, launch_rank, read_json,
                        recipe_differences, teacher_differences, write_json)
from .student_init import check_resumed_init, init_folder, init_record, load_student_init
from .trainer import STATE_FILE, Trainer, TrainerConfig, latest_checkpoint

OPTIONS_HELP = describe_options
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# ``evaluate(folder, num_images, device, grid=PNG) -> metrics``: scores an exported student folder and writes its
# sample grid to ``grid`` (fastgen.eval.evaluate.training_evaluator); an optional attribute ``check(num_images, text)``
# raises what its first call would refuse, called before training.
FolderEvaluator = Callable[..., dict]
SAMPLES_DIR = "samples"  # the sample grid of each evaluation during training: samples/step-<N>.png


def load_teacher(name_or_path: str, allow_pickle: bool = False, options: LoadOptions | None = None):
    """Load a teacher (zoo name, pipeline folder, hub id or single-file checkpoint) with every component frozen;
    clear errors otherwise. Only safetensors weights are read unless ``allow_pickle``; ``options``: the recipe's
    ``[loading]`` (see :func:`~fastgen.pipelines.loading.load_pipeline`)."""
    pipe = load_pipeline(name_or_path, what="Teacher", allow_pickle=allow_pickle, options=options)
    if getattr(pipe, network_component(pipe), None) is None:
        raise TypeError(f"Teacher {name_or_path!r} ({type(pipe).__name__}) has no unet or transformer to distill.")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


def resolve_timesteps(recipe: Recipe, pipe, schedule) -> list:
    """The student's timesteps (explicit, or the exported scheduler's for ``num_steps``), validated: whole numbers
    in [0, T-1] for VP teachers, continuous ``t = sigma T`` in (0, T] for flow teachers."""
    T = schedule.num_train_timesteps
    sampler = recipe.method_class.sampler
    # methods' own grids are grids of discrete VP timesteps; a flow student takes the teacher's shifted sigmas
    own = recipe.method_class.recipe_timesteps(T, recipe.options, recipe.student) if isinstance(
        schedule, VPSchedule) else None
    if own is not None:
        timesteps = schedule_timesteps(schedule, own)
    elif recipe.student.timesteps:
        try:
            timesteps = schedule_timesteps(schedule, recipe.student.timesteps)
        except ValueError as err:
            raise ValueError(f"student.timesteps = {recipe.student.timesteps}: {err}") from None
    else:
        timesteps = student_timesteps(schedule, recipe.student.num_steps, sampler)
    exported_scheduler(pipe, timesteps, sampler)  # fail now, not at export, if the student's folder could not reproduce them
    return timesteps


def set_resolution(pipe, resolution: int) -> None:
    """Train at ``resolution`` pixels (``data.resolution``; 0: the pipeline's default): sets the pipeline's
    ``default_sample_size`` (:func:`~fastgen.pipelines.export.set_default_resolution`) for pipelines with a
    transformer (SD3, Flux); a one-line ``ValueError`` for other pipelines or a size the latents cannot take."""
    if not resolution:
        return
    if getattr(pipe, "transformer", None) is None or not hasattr(pipe, "default_sample_size"):
        raise ValueError(f"data.resolution applies to transformer pipelines (SD3, Flux); {type(pipe).__name__} "
                         "generates at its network's sample_size: leave data.resolution = 0.")
    set_default_resolution(pipe, resolution, "data.resolution")


def build_method(recipe: Recipe, pipe, timesteps: list[int], student_init=None):
    """The recipe's method over the teacher network of ``pipe`` (its students and critics built by the method);
    ``student_init``: the trained student the student starts from (``student.init``,
    :func:`~.student_init.load_student_init`), else the teacher."""
    base = denoiser_from_pipeline(pipe)  # the schedule (with its shift at the training resolution) and latent size
    teacher = AdapterDenoiser(base.model, base.schedule, None, base.sample_size)
    default_guidance = zoo.RECOMMENDED_GUIDANCE.get(zoo.name_of(recipe.teacher) or "", None)
    return recipe.method_class(teacher, timesteps, recipe.options, student=recipe.student, critic=recipe.critic,
                               default_guidance=default_guidance, student_init=student_init)


def check_prompts(recipe: Recipe, text: bool) -> None:
    """A text-conditional teacher that is not a zoo teacher trains on the user's prompts: ``data.prompts = "zoo"``
    (the default: the zoo's ten Fashion-MNIST class prompts) is refused for it rather than used silently."""
    if text and recipe.data.prompts == "zoo" and zoo.name_of(recipe.teacher) is None:
        raise ValueError(f"data.prompts: the teacher {recipe.teacher!r} is text-conditional and not a zoo teacher, so "
                         "it needs your prompts: --set data.prompts=FILE (a text file, one prompt per line; the zoo's "
                         "are ten Fashion-MNIST class names).")


def build_data(recipe: Recipe, pipe, method, out_dir: Path, device, num_shards: int = 1, shard: int = 0) -> BatchStream:
    """Exactly the data ``method.data_needs()`` asks for -- prompts (text-conditional teachers), real samples,
    teacher ODE pairs -- as a BatchStream (``shard`` of ``num_shards``: this process's slice of every batch)."""
    needs = method.data_needs()
    text = hasattr(pipe, "encode_prompt")
    bank = PromptBank(pipe, load_prompts(recipe.data.prompts, "data.prompts"), device) if text else None
    real = real_bank = None
    if needs.real:
        if not recipe.data.real:
            off = f", or train without them: {needs.without_real}" if needs.without_real else ""
            raise ValueError(f"{needs.why_real or recipe.method} needs real images: set data.real to an image folder "
                             f"(or 'zoo': a zoo teacher's dataset){off}.")
        if recipe.data.real == "zoo":
            real = load_real(pipe, recipe.data.real, zoo.name_of(recipe.teacher), recipe.data.max_real_images,
                             out_dir / "cache" / "real.safetensors", recipe.seed)
            if text and real.prompts is not None:
                real_bank = PromptBank(pipe, real.prompts, device)
        else:  # an image folder of any size: streamed, never loaded whole
            real = RealImageStream(pipe, recipe.data.real, recipe.train.batch_size, recipe.seed,
                                   recipe.data.max_real_images, recipe.data.num_workers, num_shards, shard)
    pairs, spec = None, needs.teacher_pairs
    if spec is not None:
        pairs = teacher_ode_pairs(pipe, method.teacher, bank, spec.count, spec.steps, spec.guidance_scale,
                                  out_dir / "cache" / "ode_pairs.safetensors", recipe.seed)
    return BatchStream(recipe.train.batch_size, bank, real, real_bank, pairs, spec.batch_size if spec else 0,
                       recipe.seed, device, num_shards, shard)


def export(method, pipe, folder: Path, lora_folder: Path | None = None, extra: dict | None = None) -> Path:
    """Write the student as a plain diffusers folder (LoRA students fused; optionally also the LoRA file)."""
    spec = method.export_spec()
    model = method.student.model
    if method.student_adapter is not None:
        if lora_folder is not None:
            with writing_folder(lora_folder, marker=LORA_WEIGHTS, what="LoRA folder") as tmp:
                save_lora_weights(type(pipe), model, tmp, method.student_adapter)
        model = fuse_student(model, method.student_adapter)
    teacher_dtype = next(method.teacher.model.parameters()).dtype
    if next(model.parameters()).dtype != teacher_dtype:  # fp32 trained copies of a bf16 / fp16 teacher
        model = copy.deepcopy(model).to(teacher_dtype)  # the folder's networks in one dtype, as its pipeline needs
    # written into a temporary folder and renamed into place: a kill leaves the previous folder or none
    return export_student(pipe, folder, model=model, timesteps=spec.timesteps, sampler=spec.sampler,
                          method=spec.method, guidance_scale=spec.guidance_scale, extra_metadata=extra,
                          scheduler_config=spec.scheduler_config)


def folder_evaluation(method, pipe, out_dir: Path, evaluate_folder: FolderEvaluator, num_images: int, device):
    """``fn(step) -> metrics``: export the current student to a scratch folder, score it and write its sample grid
    to ``out_dir/samples/step-<N>.png`` (the metrics' ``"samples"``, relative to ``out_dir``), remove the folder."""

    def evaluate(step: int) -> dict:
        folder = export(method, pipe, out_dir / "eval" / f"step-{step:07d}")
        grid = Path(SAMPLES_DIR) / f"step-{step:07d}.png"
        try:
            metrics = evaluate_folder(str(folder), num_images, str(device), grid=out_dir / grid)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {**metrics, "samples": str(grid)} if (out_dir / grid).is_file() else metrics

    return evaluate


def check_resume(out_dir: Path, cfg: Recipe, last: Path) -> None:
    """Refuse a ``--resume`` that would not continue the run in ``out_dir``: a recipe that differs from its
    ``recipe.json`` outside :data:`~.runfolder.RESUMABLE_KEYS`, or ``train.steps`` below the checkpoint's step."""
    saved = read_json(out_dir / RECIPE_FILE)
    if saved is None:
        raise FileNotFoundError(f"--resume: {out_dir} has checkpoints but no {RECIPE_FILE}, so it cannot be checked "
                                "that this recipe continues that run.")
    try:  # keys added to fastgen after the run began take their defaults, as they did in the run
        saved = build_recipe(saved, str(out_dir / RECIPE_FILE)).to_dict()
    except ValueError:
        pass  # compared as it is: the differences are named below
    differ = recipe_differences(saved, cfg.to_dict())
    if differ:
        more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        raise ValueError(f"--resume: this recipe differs from the run's ({out_dir / RECIPE_FILE}): "
                         f"{'; '.join(differ[:6])}{more}. Resume with the run's recipe (fastgen train "
                         f"{out_dir / RECIPE_FILE} --out {out_dir} --resume), or start a new run in another --out.")
    step = checkpoint_step(last)
    if step > cfg.train.steps:
        raise ValueError(f"--resume: the checkpoint {last.name} is at step {step}, beyond train.steps = "
                         f"{cfg.train.steps}; set train.steps >= {step}.")


def checkpoint_step(checkpoint: Path) -> int:
    """The step a complete checkpoint folder was written at."""
    return int(read_json(checkpoint / STATE_FILE)["step"])


def resume_checkpoint(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint a run continues from: ``None`` (a new run), the latest in ``out_dir/checkpoints``
    (``resume=True``) or the given one, which must be a complete checkpoint of that run with no later one."""
    last = latest_checkpoint(out_dir / "checkpoints")
    if resume is False or resume is None:
        if last is not None:
            raise ValueError(f"{out_dir} already holds checkpoints of a run; pass --resume to continue it, "
                             "or choose another --out.")
        return None
    if resume is True:
        if last is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {out_dir / 'checkpoints'}.")
        return last
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (a folder OUT/checkpoints/checkpoint-N "
                                f"holding {STATE_FILE}).")
    if path.resolve().parent != (out_dir / "checkpoints").resolve():
        raise ValueError(f"--resume {resume} is not a checkpoint of the run in {out_dir} (give one of "
                         f"{out_dir / 'checkpoints'}, or --out its run folder).")
    step = checkpoint_step(path)
    later = sorted(p.name for p in path.parent.iterdir()
                   if p.name.startswith("checkpoint-") and (p / STATE_FILE).is_file() and checkpoint_step(p) > step)
    if later:
        raise ValueError(f"--resume {path.name}: the run holds later checkpoints ({', '.join(later)}); continuing from "
                         "an earlier one would mix two runs: move them away first, or resume from the latest.")
    return path


def check_resumed_teacher(out_dir: Path, cfg: Recipe, fingerprint: dict, what: str = "--resume") -> None:
    """Refuse a ``--resume`` (or an export) whose teacher's weights differ from the run's (``teacher.json``)."""
    saved = read_json(out_dir / TEACHER_FILE)
    if saved is None:  # a run folder from before teacher fingerprints: the teacher's name must match
        before = (read_json(out_dir / RECIPE_FILE) or {}).get("teacher")
        if before is not None and before != cfg.teacher:
            raise ValueError(f"{what}: the run's teacher is {before!r}, this one {cfg.teacher!r}.")
        return
    differ = teacher_differences(saved, {"components": fingerprint})
    if differ:
        raise ValueError(f"{what}: the teacher {cfg.teacher!r} is not the run's ({saved.get('teacher')!r}): "
                         f"its {', '.join(differ)} differ (weights or config). Use the run's teacher (--teacher), "
                         "or start a new run in another --out.")


def default_out(recipe: str | Path, cfg: Recipe) -> Path:
    """Where a run goes without ``--out``: the recipe's ``out``; for a run's ``recipe.json``, that run's folder;
    else ``runs/<recipe name>``."""
    if cfg.out:
        return Path(cfg.out)
    path = Path(recipe)
    if path.name == RECIPE_FILE and path.is_file():
        return path.parent
    return Path("runs") / cfg.name


def run_training(recipe: str, overrides: Sequence[str] = (), teacher: str | None = None, out: str | None = None,
                 resume: bool | str | Path = False, evaluate_folder: FolderEvaluator | None = None,
                 allow_pickle: bool = False) -> Path:
    """Train a student as ``recipe`` says and export it; returns the exported student folder.

    Every check that needs no teacher runs first, then the teacher is loaded; nothing is written to the run
    folder before all of them pass. The main process holds the run folder's lock (:class:`RunFolderLock`)
    until the student is exported.

    Args:
        recipe: a shipped recipe name (``dmd2_fmnist_1step``; see ``train/recipes/``), a TOML file or a
            run's ``recipe.json``.
        overrides: ``"section.key=value"`` strings (``--set``), applied after the recipe.
        teacher: replaces the recipe's teacher (zoo name, pipeline folder or hub id).
        out: run folder (default: :func:`default_out`; for a checkpoint given as ``resume``, its run folder).
        resume: ``True``: continue from the latest checkpoint in ``<out>/checkpoints``; a checkpoint folder:
            continue from it (no later checkpoint may exist). The recipe must be the run's (only
            :data:`~.runfolder.RESUMABLE_KEYS` may change; the changes are recorded in ``resumes.jsonl``) and
            the teacher must have the run's weights. Resuming a complete run exports its student again.
        evaluate_folder: scores an exported student folder, for ``train.eval_every`` (the ``fastgen``
            command passes :func:`fastgen.eval.evaluate.training_evaluator`).
        allow_pickle: let the teacher load pickled (``.bin``) weights where it has no safetensors.
    """
    cfg = load_recipe(recipe, overrides)
    if teacher is not None:
        cfg.teacher = teacher
    if not cfg.teacher:
        raise ValueError(f"Recipe {cfg.name or recipe!r} names no teacher (a recipe for your own teacher): pass "
                         "--teacher PATH_OR_HUB_ID.")
    if out is None and resume not in (True, False, None) and (Path(resume) / STATE_FILE).is_file():
        out = str(Path(resume).parent.parent)
    out_dir = check_output_dir(out or default_out(recipe, cfg))
    if cfg.student.init:
        init_folder(cfg.student.init)  # a missing folder is refused before the teacher loads
    if cfg.train.eval_every and evaluate_folder is None:
        raise ValueError("train.eval_every needs an evaluator (the fastgen command passes one; from Python, pass "
                         "evaluate_folder=fastgen.eval.evaluate.training_evaluator).")
    with RunFolderLock(out_dir, active=launch_rank() == 0):
        checkpoint = resume_checkpoint(out_dir, resume)
        saved = None
        if checkpoint is not None:
            check_resume(out_dir, cfg, checkpoint)
            saved = read_json(out_dir / RECIPE_FILE)
        return _run(cfg, out_dir, checkpoint, evaluate_folder, allow_pickle, saved)


def build_run(cfg: Recipe, out_dir: Path, allow_pickle: bool, resumed: bool, trackers: bool = True,
              student_init: bool = True):
    """``(pipe, identity, method, trainer)`` of a run of ``cfg`` in ``out_dir``: the teacher (checked against
    the run's when ``resumed``), the student's timesteps, the method and the :class:`Trainer` (no trackers
    unless ``trackers``); nothing is written. ``identity`` is what ``teacher.json`` holds: the teacher's
    fingerprint and, with ``student.init``, its folder's digest. ``student_init``: read the ``student.init`` folder
    (a new run starts from it; a resumed one checks it but takes the student from its checkpoint); ``False``
    (an export of a checkpoint, which holds the whole student): leave it alone."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    pipe = load_teacher(cfg.teacher, allow_pickle, cfg.loading)
    check_prompts(cfg, hasattr(pipe, "encode_prompt"))
    fingerprint = pipeline_fingerprint(pipe)
    identity = {"teacher": cfg.teacher, "components": fingerprint}
    if resumed:
        check_resumed_teacher(out_dir, cfg, fingerprint, "--resume" if trackers else "export")
    set_resolution(pipe, cfg.data.resolution)
    init = None
    if cfg.student.init and student_init:
        init = load_student_init(cfg.student.init, pipe)
        identity["student_init"] = init_record(cfg.student.init, init)
        if resumed:
            check_resumed_init(out_dir, identity["student_init"])
            init = None  # the checkpoint holds the student (and everything copied from it)
    timesteps = resolve_timesteps(cfg, pipe, denoiser_from_pipeline(pipe).schedule)
    method = build_method(cfg, pipe, timesteps, init)
    if cfg.student.ema_decay and method.ema_group is None:
        raise ValueError(f"student.ema_decay is set, but method {cfg.method!r} keeps no EMA.")
    trainer = build_trainer(cfg, method, out_dir, trackers)
    if trainer.accelerator.num_processes > 1:  # same initial weights everywhere (above), different noise per process
        set_seed(cfg.seed, device_specific=True)
    method = trainer.accelerator.unwrap_model(trainer.model)
    pipe.to(trainer.device)
    return pipe, identity, method, trainer


def build_trainer(cfg: Recipe, method, out_dir: Path, trackers: bool = True) -> Trainer:
    """The :class:`Trainer` of ``method`` as ``cfg.train`` says: the trained copies in ``train.trained_dtype``,
    gradient checkpointing when asked, one optimizer per group from ``cfg.optim``, the precisions checked against
    the mixed precision in force (no trackers unless ``trackers``). scripts/bench_memory.py measures this path."""
    t = cfg.train
    trainer_cfg = TrainerConfig(steps=t.steps, grad_accum=t.grad_accum, mixed_precision=t.mixed_precision or None,
                                max_grad_norm=t.max_grad_norm, ema_decay=cfg.student.ema_decay,
                                checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                                log_every=t.log_every, eval_every=t.eval_every,
                                trackers=list(t.trackers) if trackers else [], progress=t.progress, seed=cfg.seed)
    keep_trained_dtype(method, t.trained_dtype)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(method)
    trainer = Trainer(method, out_dir, trainer_cfg, cfg.optim, tracker_config=cfg.flat())
    check_precisions(method, trainer.accelerator.mixed_precision)
    return trainer


def keep_trained_dtype(method, trained_dtype: str) -> None:
    """Keep every trained parameter (student, critic, adapters, heads) in ``trained_dtype``, whatever dtype the
    teacher was loaded in (``loading.dtype``): fp32 master weights beside a bf16 teacher, as usual."""
    dtype = DTYPES[trained_dtype]
    for parameter in method.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def check_precisions(method, mixed_precision: str) -> None:
    """Networks in two dtypes (a bf16 teacher, fp32 trained copies) meet only under autocast: a one-line error when
    the run has no mixed precision."""
    dtypes = {p.dtype for p in method.parameters()}
    if len(dtypes) > 1 and mixed_precision == "no":
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        raise ValueError(f"The teacher and the trained copies are in different dtypes ({names}: loading.dtype and "
                         "train.trained_dtype), which needs mixed precision: set train.mixed_precision = 'bf16' (or "
                         "'fp16'; or accelerate's config), or the same dtype for both.")


def enable_gradient_checkpointing(method) -> int:
    """diffusers' gradient checkpointing on every network of the method: student and critic, and the frozen teacher
    too (SiD's generator loss backpropagates through it; diffusers checkpoints only passes that record gradients, so
    a teacher run without them is unaffected), each block recomputed as its forward ran
    (:func:`~fastgen.lora.checkpointing_function`); returns how many networks (a LoRA base under teacher, student
    and critic is one)."""
    from diffusers import ModelMixin

    networks: list[str] = []  # the outermost diffusers models (a UNet's Transformer2DModel blocks are inside it)
    for name, module in method.named_modules():
        if any(name.startswith(outer + ".") for outer in networks) or not isinstance(module, ModelMixin):
            continue
        if getattr(module, "_supports_gradient_checkpointing", False):
            module.enable_gradient_checkpointing(checkpointing_function(module))
            networks.append(name)
    return len(networks)


def lora_output(cfg: Recipe, pipe, folder: Path) -> Path | None:
    """``folder`` when the run also writes its LoRA file there (``train.export_lora``), else ``None``."""
    if not (cfg.student.lora_rank and cfg.train.export_lora):
        return None
    if not hasattr(type(pipe), "save_lora_weights"):
        print(f"note: {type(pipe).__name__} has no LoRA loader, so only the fused student is exported "
              "(train.export_lora applies to pipelines with one).")
        return None
    return folder


def export_trained(cfg: Recipe, method, pipe, trainer: Trainer, folder: Path, lora_folder: Path | None,
                   step: int) -> Path:
    """Export the student as trained (its EMA weights when it keeps one) with the run's metadata."""
    extra = {"recipe": cfg.name, "train_steps": step, "teacher_guidance": getattr(method, "guidance_scale", None),
             "lora_rank": cfg.student.lora_rank}
    with trainer.student_weights():
        return export(method, pipe, folder, lora_folder, extra)


def _run(cfg: Recipe, out_dir: Path, checkpoint: Path | None, evaluate_folder, allow_pickle: bool,
         saved: dict | None) -> Path:
    """The body of :func:`run_training`, inside the run folder's lock (``saved``: the run's recipe on resume)."""
    t = cfg.train
    pipe, identity, method, trainer = build_run(cfg, out_dir, allow_pickle, resumed=checkpoint is not None)
    saved_steps = (saved or {}).get("train", {}).get("steps")
    if checkpoint is not None and saved_steps != t.steps and len(method.rounds(t.steps)) > 1:
        raise ValueError(f"--resume: method {cfg.method!r} trains in rounds whose lengths follow train.steps, so it "
                         f"cannot change on resume (the run's: {saved_steps}, now {t.steps}).")
    lora_folder = lora_output(cfg, pipe, out_dir / "student_lora")
    acc = trainer.accelerator
    if t.eval_every:
        check = getattr(evaluate_folder, "check", None)  # the evaluator's own refusals, before the data is made
        if check is not None:
            check(t.eval_images, hasattr(pipe, "encode_prompt"))
        trainer.evaluate = folder_evaluation(method, pipe, out_dir, evaluate_folder, t.eval_images, trainer.device)
    if len(trainer.round_ends) > 1:  # a method with rounds: each round's student is a folder of its own
        trainer.on_round_end = lambda r, step: export(method, pipe, out_dir / "rounds" / f"round-{r}",
                                                      extra={"recipe": cfg.name, "round": r, "train_steps": step})
    with acc.main_process_first():  # the main process writes the caches (real latents, ODE pairs), the others read them
        batches = build_data(cfg, pipe, method, out_dir, trainer.device, acc.num_processes, acc.process_index)
    if acc.is_main_process:  # every check has passed: the run's identity, then training
        if checkpoint is not None:
            record_resume(out_dir, saved, cfg.to_dict(), checkpoint)
        write_json(out_dir / RECIPE_FILE, cfg.to_dict())
        write_json(out_dir / TEACHER_FILE, identity)
    try:
        summary = trainer.train(batches, resume=checkpoint is not None, checkpoint=checkpoint)
    finally:
        batches.close()
    folder = out_dir / "student"
    if acc.is_main_process:
        export_trained(cfg, method, pipe, trainer, folder, lora_folder, t.steps)
        speed = f" at {summary['s_per_step']:.3f} s/step" if summary["s_per_step"] is not None else ""
        print(f"trained {summary['steps_run']} steps{speed}; wrote {folder}")
    trainer.end()
    return folder


def record_resume(out_dir: Path, saved: dict | None, now: dict, checkpoint: Path) -> None:
    """Append to ``out_dir/resumes.jsonl`` when and from which checkpoint the run was resumed, with every recipe
    key whose value changed (``recipe.json`` then holds the values in force; the earlier ones stay here)."""
    import sys
    import time

    before, after = flatten(saved or {}), flatten(now)
    changed = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": checkpoint.name,
              "step": checkpoint_step(checkpoint), "changed": changed, "command": " ".join(sys.argv)}
    with open(out_dir / RESUMES_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    # Resuming by a recipe's name takes that recipe's values of the resumable keys, not the run's: say which moved.
    moved = {k: v for k, v in changed.items() if k not in ("out", "name")}
    if moved:
        print("note: this resume changes " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in moved.items())
              + f" (recorded in {out_dir / RESUMES_FILE}; to keep a run's value, resume with its {RECIPE_FILE} "
              "or --set the key)")


def locate_checkpoint(run_or_checkpoint: str | Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` of a run folder (its latest complete checkpoint) or of a checkpoint folder."""
    path = Path(run_or_checkpoint)
    if (path / STATE_FILE).is_file():
        run_dir = path.parent.parent
    elif path.is_dir() and (path / RECIPE_FILE).is_file():
        run_dir, last = path, latest_checkpoint(path / "checkpoints")
        if last is None:
            raise FileNotFoundError(f"{run_or_checkpoint} holds no complete checkpoint (checkpoints/checkpoint-N).")
        path = last
    else:
        raise FileNotFoundError(f"{run_or_checkpoint} is neither a run folder (with {RECIPE_FILE} and checkpoints/) "
                                f"nor a checkpoint folder (checkpoints/checkpoint-N with {STATE_FILE}).")
    if not (run_dir / RECIPE_FILE).is_file():
        raise FileNotFoundError(f"Checkpoint {path} is not inside a run folder: {run_dir} has no {RECIPE_FILE}.")
    return run_dir, path


def export_checkpoint(run_or_checkpoint: str | Path, out: str | Path | None = None, teacher: str | None = None,
                      allow_pickle: bool = False) -> Path:
    """Export the student of a run's checkpoint as a plain diffusers folder, without training; returns the folder.

    The same export as at the end of training (:func:`export_trained`: EMA weights, LoRA students fused and, with
    ``train.export_lora``, also the LoRA file beside it as ``<out>_lora``), from the run's ``recipe.json`` and
    teacher, which must have the run's weights (``teacher.json``).

    Args:
        run_or_checkpoint: a run folder (its latest complete checkpoint) or a checkpoint folder of one.
        out: output folder (default: ``<run>/student-step-<N>``; an existing folder is replaced only if it holds a
            pipeline).
        teacher: the teacher, when it is no longer where ``recipe.json`` says (zoo name, folder or hub id).
        allow_pickle: let the teacher load pickled (``.bin``) weights where it has no safetensors.
    """
    run_dir, checkpoint = locate_checkpoint(run_or_checkpoint)
    cfg = load_recipe(run_dir / RECIPE_FILE)
    if teacher is not None:
        cfg.teacher = teacher
    step = checkpoint_step(checkpoint)
    folder = check_output_dir(out if out is not None else run_dir / f"student-step-{step:07d}")
    check_replaceable(folder, "model_index.json", "--out")
    pipe, _, method, trainer = build_run(cfg, run_dir, allow_pickle, resumed=True, trackers=False, student_init=False)
    trainer.load_checkpoint(checkpoint)
    lora_folder = lora_output(cfg, pipe, folder.with_name(folder.name + "_lora"))
    export_trained(cfg, method, pipe, trainer, folder, lora_folder, step)
    trainer.end()
    print(f"exported {checkpoint} (step {step}) to {folder}")
    return folder


__all__ = ["run_training", "export_checkpoint", "load_teacher", "build_method", "build_data", "build_run", "export",
           "export_trained", "build_trainer", "resolve_timesteps", "resume_checkpoint", "locate_checkpoint",
           "folder_evaluation", "OPTIONS_HELP", "describe_options"]
