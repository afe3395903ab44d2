"""``fastgen train RECIPE``: from a recipe to an exported student folder.

:func:`run_training` loads the recipe (with ``--set`` overrides), the teacher pipeline, builds the
method (student, critic), the data stream and the :class:`~fastgen.train.trainer.Trainer`, trains,
and exports the student through :mod:`fastgen.pipelines` as a plain diffusers folder
(``<out>/student``; LoRA students also as ``<out>/student_lora/pytorch_lora_weights.safetensors``).

Run folder layout: ``recipe.json`` (the resolved recipe), ``checkpoints/``, ``logs/`` (trackers),
``cache/`` (encoded real images, teacher ODE pairs), ``eval.jsonl``, ``train_log.json``, ``student/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch

from fastgen import zoo
from fastgen.critic import FakeScoreCritic
from fastgen.lora import AdapterDenoiser
from fastgen.methods import DMD, DMD2, METHODS, make_student
from fastgen.pipelines.loading import load_pipeline
from fastgen.pipelines.export import exported_scheduler
from fastgen.pipelines.sampler import check_timesteps, student_timesteps
from fastgen.schedule import schedule_from_scheduler_config

from .data import BatchStream, PromptBank, load_prompts, load_real, teacher_ode_pairs
from .recipes import Recipe, describe_options, load_recipe
from .trainer import OptimizerConfig, Trainer, TrainerConfig, latest_checkpoint

OPTIONS_HELP = describe_options


def load_teacher(name_or_path: str):
    """Load a teacher (zoo name, pipeline folder or hub id) with every component frozen; clear errors otherwise."""
    pipe = load_pipeline(name_or_path, what="Teacher")
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise TypeError(f"Teacher {name_or_path!r} ({type(pipe).__name__}) has no unet or transformer to distill.")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


def zoo_name_of(teacher: str) -> str | None:
    """The zoo teacher a recipe's teacher is (by name or by its folder), for zoo data and evaluation."""
    return zoo.name_of(teacher)


def resolve_timesteps(recipe: Recipe, pipe, schedule) -> list[int]:
    """The student's timesteps (explicit, or the exported scheduler's for ``num_steps``), validated."""
    T = schedule.num_train_timesteps
    if recipe.student.timesteps:
        timesteps = check_timesteps(recipe.student.timesteps, T)
    else:
        if recipe.student.num_steps < 1:
            raise ValueError(f"student.num_steps must be >= 1, got {recipe.student.num_steps}.")
        timesteps = student_timesteps(schedule, recipe.student.num_steps)
    exported_scheduler(pipe, timesteps)  # fail now, not at export, if the student's folder could not reproduce them
    if recipe.method == "dmd" and len(timesteps) != 1:
        raise ValueError(f"DMD trains one-step generators; got {len(timesteps)} timesteps (use method = \"dmd2\").")
    return timesteps


def build_method(recipe: Recipe, pipe, timesteps: list[int]):
    """Teacher, student and critic (full copies or LoRA adapters on the teacher network), and the method."""
    if recipe.method not in METHODS:
        raise ValueError(f"Unknown method {recipe.method!r}; available: {', '.join(METHODS)}.")
    network = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    teacher = AdapterDenoiser(network, schedule_from_scheduler_config(pipe.scheduler.config), None)
    s, c, d = recipe.student, recipe.critic, recipe.dmd
    student = make_student(teacher, s.lora_rank, s.lora_alpha or None)
    critic = FakeScoreCritic(teacher, c.lora_rank, c.lora_alpha or None, gan_head=c.gan_head, weighting=c.weighting,
                             t_range=(c.t_min, c.t_max))
    guidance = d.guidance_scale
    if guidance is None:
        guidance = zoo.RECOMMENDED_GUIDANCE.get(zoo_name_of(recipe.teacher) or "", None)
    if guidance is not None and teacher.is_conditional is False:
        raise ValueError(f"dmd.guidance_scale = {guidance}, but the teacher is unconditional.")
    if recipe.method == "dmd":
        return DMD(teacher, student, critic, guidance, d.regression_weight, (d.dm_t_min, d.dm_t_max), timesteps)
    return DMD2(teacher, student, critic, timesteps, guidance, d.ratio, d.gan_generator_weight, d.gan_critic_weight,
                (d.dm_t_min, d.dm_t_max))


def build_data(recipe: Recipe, pipe, method, out_dir: Path, device, num_shards: int = 1, shard: int = 0) -> BatchStream:
    """Prompts (conditional teachers), real images (GAN) and teacher ODE pairs (DMD), as a BatchStream
    (``shard`` of ``num_shards``: this process's slice of every global batch)."""
    text = hasattr(pipe, "encode_prompt")
    bank = PromptBank(pipe, load_prompts(recipe.data.prompts), device) if text else None
    needs_real = recipe.critic.gan_head and (recipe.dmd.gan_critic_weight > 0 or recipe.dmd.gan_generator_weight > 0)
    real = real_bank = None
    if needs_real and not recipe.data.real:
        raise ValueError("The GAN loss needs real images: set data.real to 'zoo' or an image folder "
                         "(or dmd.gan_*_weight = 0 for data-free training).")
    if recipe.data.real and needs_real:
        real = load_real(pipe, recipe.data.real, zoo_name_of(recipe.teacher), recipe.data.max_real_images,
                         out_dir / "cache" / "real.pt", recipe.seed)
        if text and real.prompts is not None:
            real_bank = PromptBank(pipe, real.prompts, device)
    pairs = None
    if isinstance(method, DMD) and not isinstance(method, DMD2) and method.regression_weight:
        pairs = teacher_ode_pairs(pipe, method.teacher, bank, recipe.dmd.ode_pairs, recipe.dmd.ode_steps,
                                  method.guidance_scale, out_dir / "cache" / "ode_pairs.pt", recipe.seed)
    return BatchStream(recipe.train.batch_size, bank, real, real_bank, pairs, recipe.dmd.pair_batch_size,
                       recipe.seed, device, num_shards, shard)


def export(method, pipe, folder: Path, lora_folder: Path | None = None, extra: dict | None = None) -> Path:
    """Write the student as a plain diffusers folder (LoRA students fused; optionally also the LoRA file)."""
    from fastgen.pipelines.export import export_student
    from fastgen.pipelines.lora import fuse_student, save_lora_weights

    info = method.export_info()
    model = method.student.model
    if method.student_adapter is not None:
        if lora_folder is not None:
            save_lora_weights(type(pipe), model, lora_folder, method.student_adapter)
        model = fuse_student(model, method.student_adapter)
    if folder.exists():
        shutil.rmtree(folder)
    return export_student(pipe, folder, model=model, timesteps=info["timesteps"], sampler=info["sampler"],
                          method=info["method"], guidance_scale=info["guidance_scale"], extra_metadata=extra)


def make_evaluator(recipe: Recipe, pipe, method, out_dir: Path, zoo_name: str, device):
    """FD (and prompt accuracy) of the current student through ``fastgen.eval``: export, evaluate, clean up."""

    def evaluate(step: int) -> dict:
        from fastgen.eval.evaluate import evaluate as run_eval

        folder = export(method, pipe, out_dir / "eval" / f"step-{step:07d}")
        try:
            metrics = "fd,acc" if hasattr(pipe, "encode_prompt") else "fd"
            result = run_eval(str(folder), num_images=recipe.train.eval_images, metrics=metrics, progress=False,
                              device=str(device))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {k: v for k, v in result["metrics"].items() if k in ("fd", "acc")}

    return evaluate


def run_training(recipe: str, overrides: Sequence[str] = (), teacher: str | None = None, out: str | None = None,
                 resume: bool = False) -> Path:
    """Train a student as ``recipe`` says and export it; returns the exported student folder.

    Args:
        recipe: a shipped recipe name (``dmd2_fmnist_1step``; see ``train/recipes/``) or a TOML file.
        overrides: ``"section.key=value"`` strings (``--set``), applied after the recipe.
        teacher: replaces the recipe's teacher (zoo name, pipeline folder or hub id).
        out: run folder (default: the recipe's ``out``, else ``runs/<recipe name>``).
        resume: continue from the latest checkpoint in ``<out>/checkpoints``.
    """
    from accelerate.utils import set_seed

    cfg = load_recipe(recipe, overrides)
    if teacher is not None:
        cfg.teacher = teacher
    out_dir = Path(out or cfg.out or Path("runs") / cfg.name)
    if not resume and latest_checkpoint(out_dir / "checkpoints") is not None:
        raise ValueError(f"{out_dir} already holds checkpoints of a run; pass --resume to continue it, "
                              "or choose another --out.")
    if resume and latest_checkpoint(out_dir / "checkpoints") is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {out_dir / 'checkpoints'}.")
    set_seed(cfg.seed)
    pipe = load_teacher(cfg.teacher)
    schedule = schedule_from_scheduler_config(pipe.scheduler.config)
    timesteps = resolve_timesteps(cfg, pipe, schedule)
    method = build_method(cfg, pipe, timesteps)
    s, c, t = cfg.student, cfg.critic, cfg.train
    zoo_name = zoo_name_of(cfg.teacher)
    if t.eval_every and zoo_name is None:
        raise ValueError("train.eval_every measures FD with the zoo's classifiers: it needs a zoo teacher.")
    optimizers = {"generator": OptimizerConfig(s.lr, tuple(s.betas), s.weight_decay, warmup_steps=s.warmup_steps),
                  "critic": OptimizerConfig(c.lr, tuple(c.betas), c.weight_decay, warmup_steps=c.warmup_steps)}
    trainer_cfg = TrainerConfig(steps=t.steps, grad_accum=t.grad_accum, mixed_precision=t.mixed_precision,
                                max_grad_norm=t.max_grad_norm, ema_decay=s.ema_decay,
                                checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                                log_every=t.log_every, eval_every=t.eval_every, trackers=list(t.trackers),
                                progress=t.progress, seed=cfg.seed)
    trainer = Trainer(method, out_dir, trainer_cfg, optimizers, tracker_config=cfg.flat())
    acc = trainer.accelerator
    if acc.num_processes > 1:  # same initial weights everywhere (above), different noise per process from here
        set_seed(cfg.seed, device_specific=True)
    method = acc.unwrap_model(trainer.model)
    pipe.to(trainer.device)
    if t.eval_every:
        trainer.evaluate = make_evaluator(cfg, pipe, method, out_dir, zoo_name, trainer.device)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    with acc.main_process_first():  # the main process writes the caches (real latents, ODE pairs), the others read them
        batches = build_data(cfg, pipe, method, out_dir, trainer.device, acc.num_processes, acc.process_index)
    summary = trainer.train(batches, resume=resume)
    folder = out_dir / "student"
    if acc.is_main_process:
        extra = {"recipe": cfg.name, "train_steps": t.steps, "teacher_guidance": getattr(method, "guidance_scale", None),
                 "lora_rank": s.lora_rank}
        with trainer.student_weights():
            export(method, pipe, folder, out_dir / "student_lora" if (s.lora_rank and t.export_lora) else None, extra)
        print(f"trained {summary['steps_run']} steps at {summary['s_per_step']:.3f} s/step; wrote {folder}")
    trainer.end()
    return folder


__all__ = ["run_training", "load_teacher", "build_method", "build_data", "export", "resolve_timesteps", "OPTIONS_HELP",
           "describe_options"]
