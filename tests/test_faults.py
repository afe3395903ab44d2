"""Faults and bad input across every command: nothing lost, nothing silent.

* Bad input (parametrised, through the ``fastgen`` command): exit status 2, one line naming the input, no
  traceback, and nothing under the run folder, the output paths or the zoo changed.
* Bad input to the Python API: a one-line ``ValueError`` naming the input.
* Non-finite values: a teacher that outputs NaN stops the run naming the step, before any backward or
  checkpoint; SiD masks non-finite samples, logs how many, and stops when a whole batch is masked.
* Real ``kill -9`` (SIGKILL, no clean-up) of a training subprocess during a checkpoint write, during the
  export, between the export's two renames, and in training while a second process is refused by the
  run folder's lock; each run is resumed and ends bit-equal to an uninterrupted run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot, tiny_cond_unet, tiny_recipe, tiny_sd_pipeline, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from safetensors.torch import load_file

import fastgen.zoo
from fastgen.cli import main
from fastgen.methods import DMD2, SiD
from fastgen.train.runner import run_training
from fastgen.train.trainer import NonFiniteLossError, latest_checkpoint

ZOO = Path(fastgen.zoo.__file__).parent


def clean_fid_stats_dir() -> Path:
    import cleanfid

    return Path(cleanfid.__file__).parent / "stats"
STEPS = 6  # the tiny runs: 6 steps, a checkpoint every 2


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def teacher(root):
    """A tiny DDPMPipeline teacher (safetensors)."""
    torch.manual_seed(0)
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "teacher")
    return root / "teacher"


@pytest.fixture(scope="module")
def recipe(root):
    """DMD2 without a [dmd2] section (the cases switch methods with --set method=...; runs pass dmd2.ratio=2)."""
    return Path(tiny_recipe(root / "tiny.toml", ratio=None, ema_decay=0.5, steps=STEPS, checkpoint_every=2))


@pytest.fixture(scope="module")
def one_thread():
    """Bit-equality between a run and its resumed copy (in this process and in subprocesses) needs the same
    reduction order: one thread everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole(root, teacher, recipe, one_thread):
    """The uninterrupted run every interrupted one must equal (also the finished run of the resume cases)."""
    run_training(str(recipe), ["dmd2.ratio=2"], teacher=str(teacher), out=str(root / "whole"))
    return root / "whole"


@pytest.fixture(scope="module")
def files(root, teacher):
    """Inputs of the bad-input cases."""
    f = root / "inputs"
    f.mkdir()
    (f / "file.txt").write_text("not a folder\n")
    (f / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (f / "empty.txt").write_text("\n\n")
    (f / "bad.toml").write_text("method = [unclosed\n")
    (f / "unrelated").mkdir()
    (f / "unrelated" / "notes.md").write_text("someone's notes\n")
    (f / "empty_dir").mkdir()
    (f / "prompts.txt").write_text("a photo of a bag\n")
    (f / "broken_images").mkdir()
    (f / "broken_images" / "bad.png").write_bytes(b"not a png")
    (f / "no_checkpoint" / "checkpoints").mkdir(parents=True)
    (f / "no_checkpoint" / "recipe.json").write_text("{}")
    np.savez(f / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    torch.manual_seed(1)  # another teacher: same architecture, other weights
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(f / "other")
    torch.manual_seed(0)
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(f / "pickled", safe_serialization=False)
    tiny_sd_pipeline(f / "sd").save_pretrained(f / "sd")  # a text-conditional teacher that is not in the zoo
    return f


# --- bad input through the command ------------------------------------------------------------------
# (argv, the text the one-line message must contain). Placeholders: {recipe} the tiny recipe, {teacher} its
# DDPM teacher, {run} a finished run of it, {new} a run folder that does not exist, {f} the input files.
TRAIN = ["train", "{recipe}", "--teacher", "{teacher}", "--out", "{new}"]
RESUME = ["train", "{recipe}", "--teacher", "{teacher}", "--out", "{run}", "--resume", "--set", "dmd2.ratio=2"]
PD = ["train", "pd_digits", "--teacher", "{teacher}", "--out", "{new}"]
EVAL = ["eval", "digits-ddpm", "--steps", "1", "--num-images", "10", "--out", "{new}"]
BENCH = ["bench", "digits-ddpm", "--num-images", "10", "--nfes", "1", "--out", "{new}"]
CASES = [
    # recipe values and keys (checked before anything is loaded)
    (TRAIN + ["--set", "train.grad_accum=0"], "grad_accum must be >= 1"),
    (TRAIN + ["--set", "train.batch_size=0"], "batch_size must be >= 1"),
    (TRAIN + ["--set", "train.steps=0"], "steps must be >= 1"),
    (TRAIN + ["--set", "train.steps=-5"], "steps must be >= 1"),
    (TRAIN + ["--set", "train.checkpoint_every=-1"], "checkpoint_every must be >= 0"),
    (TRAIN + ["--set", "train.keep_checkpoints=0"], "keep_checkpoints must be >= 1"),
    (TRAIN + ["--set", "train.log_every=-5"], "log_every must be >= 0"),
    (TRAIN + ["--set", "train.eval_images=0"], "eval_images must be >= 1"),
    (TRAIN + ["--set", "train.mixed_precision=fp8"], "mixed_precision must be '' (accelerate's config), 'no', 'bf16' or 'fp16', not 'fp8'"),
    (TRAIN + ["--set", "train.max_grad_norm=nan"], "max_grad_norm must be >= 0"),
    (TRAIN + ["--set", "train.stpes=3"], "unknown recipe key 'train.stpes'"),
    (TRAIN + ["--set", "colour=3"], "unknown recipe key 'colour'"),
    (TRAIN + ["--set", "train.steps=many"], "'train.steps' expects int"),
    (TRAIN + ["--set", "dmd2.guidance_scale=-1"], "guidance_scale must be a finite number >= 0"),
    (TRAIN + ["--set", "dmd2.guidance_scale=nan"], "guidance_scale must be a finite number >= 0"),
    (TRAIN + ["--set", "dmd2.guidance_scale=inf"], "guidance_scale must be a finite number >= 0"),
    (TRAIN + ["--set", "method=sid", "--set", "sid.guidance_scale=-2"], "guidance_scale must be a finite number >= 0"),
    (TRAIN + ["--set", "dmd2.ratio=0"], "ratio must be >= 1"),
    (TRAIN + ["--set", "dmd2.dm_t_min=1.5"], "dm_t_min, dm_t_max must satisfy 0 <= t_min <= t_max <= 1"),
    (TRAIN + ["--set", "optim.critic.lr=-1"], "[optim.critic] lr must be > 0"),
    (TRAIN + ["--set", "optim.generator.betas=[0.9]"], "betas must be two numbers in [0, 1)"),
    (TRAIN + ["--set", "optim.teacher.lr=1"], "unknown optimizer group [optim.teacher]"),
    (TRAIN + ["--set", "student.num_steps=0"], "num_steps must be >= 1"),
    (TRAIN + ["--set", "student.lora_rank=-1"], "lora_rank and lora_alpha must be >= 0"),
    (TRAIN + ["--set", 'student.lora_targets=["to_q"]'], "adapts a LoRA student, but lora_rank = 0"),
    (TRAIN + ["--set", "student.lora_targets=[3]"], "each must be a module name suffix"),
    (TRAIN + ["--set", "student.lora_rank=2", "--set", 'student.lora_targets=["to_q", "ffn"]'],
     "LoRA targets ['ffn'] match no module of the UNet2DModel; module name suffixes such as to_q"),
    (TRAIN + ["--set", "student.ema_decay=1.0"], "ema_decay must be in [0, 1)"),
    (TRAIN + ["--set", "student.timesteps=[999.5]"], "must be whole numbers, got 999.5"),
    (TRAIN + ["--set", "student.timesteps=[499, 999]"], "must be strictly descending, got [499, 999]"),
    (TRAIN + ["--set", "student.num_steps=4", "--set", "student.timesteps=[749]"],
     "num_steps = 4, but timesteps = [749] are 1; set student.timesteps=[] to let num_steps choose them"),
    (TRAIN + ["--set", "loading.dtype=fp8"], "[loading] dtype must be one of fp32, fp16, bf16, not 'fp8'"),
    (TRAIN + ["--set", "train.trained_dtype=fp64"], "trained_dtype must be fp32, bf16 or fp16, not 'fp64'"),
    (TRAIN + ["--dtype", "bf16", "--set", "train.mixed_precision=no"],
     "The teacher and the trained copies are in different dtypes (bfloat16, float32"),
    (TRAIN + ["--component", "vae"], "--component 'vae' must look like NAME=none or NAME=FOLDER"),
    (["train", "dmd2_1step", "--out", "{new}"], "names no teacher (a recipe for your own teacher): pass --teacher"),
    (["train", "dmd2_1step", "--teacher", "{f}/sd", "--out", "{new}"],
     "data.prompts: the teacher '{f}/sd' is text-conditional and not a zoo teacher"),
    (TRAIN + ["--set", "critic.weighting=foo"], "weighting must be one of own, edm, not 'foo'"),
    (TRAIN + ["--set", "sid.alpha=1.0"], "section [sid] holds options of method 'sid'"),
    (TRAIN + ["--set", "method=nope"], "Unknown method 'nope'"),
    (TRAIN + ["--set", "data.max_real_images=0"], "max_real_images must be >= 1"),
    (TRAIN + ["--set", "train.steps"], "'train.steps' must look like key=value"),
    (TRAIN + ["--set", "a.b.c=1"], "'a.b.c' is nested too deep"),
    (["train", "/no/such/recipe.toml", "--out", "{new}"], "Recipe file /no/such/recipe.toml not found"),
    (["train", "no_such_recipe", "--out", "{new}"], "Unknown recipe 'no_such_recipe'"),
    (["train", "{f}/bad.toml", "--out", "{new}"], "bad.toml: invalid TOML"),
    # teacher and run folder
    (["train", "{recipe}", "--teacher", "/no/such/teacher", "--out", "{new}"], "'/no/such/teacher' is neither a zoo"),
    (["train", "{recipe}", "--teacher", "{f}/unrelated", "--out", "{new}"], "unrelated' is not a diffusers pipeline"),
    (["train", "{recipe}", "--teacher", "{f}/pickled", "--out", "{new}"], "loads only safetensors weights"),
    (["train", "{recipe}", "--teacher", "{teacher}", "--out", "{f}/file.txt"], "file.txt is an existing file"),
    (["train", "{recipe}", "--teacher", "{teacher}", "--out", "/proc/fastgen-run"],
     "/proc/fastgen-run cannot be written"),
    (["train", "{recipe}", "--teacher", "{teacher}", "--out", "{f}/file.txt/run"], "file.txt is a file"),
    (TRAIN + ["--set", "student.timesteps=[1000]"], "Timesteps [1000] are out of range [0, 999]"),
    (TRAIN + ["--set", "student.timesteps=[300, 749]"], "Timesteps must be strictly descending, got [300, 749]"),
    (TRAIN + ["--set", "dmd2.gan_generator_weight=0.1"], "gan_critic_weight need the critic's GAN head"),
    (TRAIN + ["--set", "critic.gan_head=true"], "critic.gan_head = true trains a GAN head only with"),
    (TRAIN + ["--set", "critic.gan_head=true", "--set", "dmd2.gan_critic_weight=0.1"],
     "needs real images: set data.real"),
    (TRAIN + ["--set", "method=dmd", "--set", "critic.gan_head=true"], "dmd has no GAN term"),
    (TRAIN + ["--set", "method=sid", "--set", "sid.gan_generator_weight=0.1"],
     "sid.gan_generator_weight / gan_critic_weight need the critic's GAN head"),
    (TRAIN + ["--set", "method=sid", "--set", "critic.gan_head=true"],
     "critic.gan_head = true trains a GAN head only with sid.gan_generator_weight or sid.gan_critic_weight > 0"),
    (TRAIN + ["--set", "method=sid", "--set", "critic.gan_head=true", "--set", "sid.gan_critic_weight=0.1"],
     "sid's GAN loss (critic.gan_head with sid.gan_*_weight > 0) needs real images: set data.real"),
    (TRAIN + ["--set", "critic.gan_head=true", "--set", "dmd2.gan_critic_weight=0.1", "--set",
              "data.real=/no/such/images"], "Image folder /no/such/images does not exist"),
    (TRAIN + ["--set", "critic.gan_head=true", "--set", "dmd2.gan_critic_weight=0.1", "--set",
              "data.real={f}/empty_dir"], "empty_dir has no images"),
    (TRAIN + ["--set", "critic.gan_head=true", "--set", "dmd2.gan_critic_weight=0.1", "--set",
              "data.real={f}/broken_images"], "bad.png cannot be read"),
    (TRAIN + ["--set", "data.num_workers=-1"], "num_workers must be >= 0"),
    (TRAIN + ["--set", "dmd2.guidance_scale=2"], "dmd2.guidance_scale = 2.0, but the teacher is unconditional"),
    (TRAIN + ["--set", "method=sid", "--set", "sid.guidance=lsg"], "sid.guidance = 'lsg' needs a text-conditional"),
    (PD + ["--set", "student.num_steps=5", "--set", "progressive.teacher_steps=48"],
     "progressive.teacher_steps = 48 does not halve to student.num_steps = 5 (48 -> 24 -> 12 -> 6)"),
    (PD + ["--set", "progressive.prediction_type=epsilon"], "an epsilon-output student cannot take a step to t = 0"),
    (PD + ["--set", "progressive.weighting=l1"], "weighting must be one of truncated_snr, x0, eps, not 'l1'"),
    (PD + ["--set", "progressive.guidance_min=1.0", "--set", "progressive.guidance_max=3.0"],
     "progressive.guidance_min/guidance_max (guided PD) needs a teacher network "
     "that takes diffusers' guidance embedding (time_cond_proj_dim): UNet2DConditionModel; this teacher's network is a "
     "UNet2DModel"),
    (["train", "cd_digits", "--teacher", "{teacher}", "--out", "{new}", "--set", "cd.skip=600"],
     "cd.skip = 600 is larger than the grid allows: T = 1000 teacher timesteps give T // skip = 1 grid points"),
    (["train", "cd_digits", "--teacher", "{teacher}", "--out", "{new}", "--set", "cd.skip=30"],
     "cd.skip = 30 must divide the teacher's T = 1000 timesteps"),
    (["train", "cd_digits", "--teacher", "{teacher}", "--out", "{new}", "--set", "cd.solver=euler"],
     "solver must be one of ddim, heun, not 'euler'"),
    (["train", "lcm_fmnist", "--teacher", "{teacher}", "--out", "{new}", "--set", "lcm.skip=500"],
     "lcm.skip = 500 is larger than the grid allows: T = 1000 teacher timesteps give T // skip = 2 grid points, "
     "fewer than 4"),
    (PD + ["--set", "student.num_steps=1", "--set", "progressive.teacher_steps=2048"],
     "progressive.teacher_steps = 2048 exceeds the teacher's 1000 timesteps"),
    (["train", "lcm_fmnist", "--teacher", "{teacher}", "--out", "{new}"], "lcm.guidance_embedding needs a teacher "
     "network that takes diffusers' guidance embedding (time_cond_proj_dim): UNet2DConditionModel; this teacher's "
     "network is a UNet2DModel"),
    (["train", "lcm_lora_fmnist", "--out", "{new}", "--set", "lcm.guidance_embedding=true"],
     "lcm.guidance_embedding = true needs a full-weight student"),
    (TRAIN + ["--set", "train.trackers=['no-such-tracker-fastgen']"], "no-such-tracker-fastgen"),
    (TRAIN + ["--set", "train.steps=none"], "Recipe key 'train.steps' expects int, got 'none' (str)"),  # only optional keys
    # the evaluator's counts, before the 2048 teacher ODE pairs are made
    (["train", "sid_fmnist_1step", "--out", "{new}", "--set", "train.eval_every=1", "--set", "train.eval_images=20"],
     "fd_class needs at least 10 images per class: train.eval_images = 100 or more for 10 classes (got 20)"),
    (["train", "sid_digits_1step", "--out", "{new}", "--set", "train.eval_every=1", "--set", "train.eval_images=5"],
     "at least 10 images needed, got train.eval_images = 5"),
    (["train", "{recipe}", "--teacher", "fmnist-ldm", "--out", "{new}", "--set", "data.prompts=/no/prompts.txt"],
     "Prompt file '/no/prompts.txt' not found"),
    (["train", "{recipe}", "--teacher", "fmnist-ldm", "--out", "{new}", "--set", "data.prompts={f}/binary.txt"],
     "binary.txt' is not UTF-8 text"),
    (["train", "{recipe}", "--teacher", "fmnist-ldm", "--out", "{new}", "--set", "data.prompts={f}/empty.txt"],
     "No prompts in"),
    # --resume of another run
    (["train", "{recipe}", "--teacher", "{teacher}", "--out", "{new}", "--resume"], "--resume: no complete checkpoint"),
    (["train", "{recipe}", "--teacher", "{teacher}", "--out", "{run}"], "already holds checkpoints of a run"),
    (RESUME + ["--set", "student.lora_rank=2"], "student.lora_rank: 0 in the run, 2 now"),
    (RESUME + ["--set", "dmd2.ratio=3"], "dmd2.ratio: 2 in the run, 3 now"),
    (RESUME + ["--set", "seed=1"], "seed: 0 in the run, 1 now"),
    (RESUME + ["--set", "train.batch_size=2"], "train.batch_size: 4 in the run, 2 now"),
    (["train", "{recipe}", "--teacher", "{teacher}", "--out", "{run}", "--resume", "--set", "method=sid"],
     "this recipe differs from the run's ({run}/recipe.json): method: 'dmd2' in the run, 'sid' now; "),
    (RESUME + ["--set", "train.steps=3"], "the checkpoint checkpoint-0000006 is at step 6, beyond train.steps = 3"),
    (["train", "{recipe}", "--teacher", "{f}/other", "--out", "{run}", "--resume", "--set", "dmd2.ratio=2"],
     "is not the run's (", ),
    # eval: every check before the first image
    (EVAL + ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (EVAL + ["--batch-size", "-3"], "--batch-size must be a positive integer, got -3"),
    (EVAL + ["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (EVAL + ["--guidance", "nan"], "--guidance must be a finite number >= 0"),
    (EVAL + ["--steps", "0"], "--steps must be a positive integer, got 0"),
    (EVAL + ["--num-images", "0"], "got --num-images 0"),
    (EVAL + ["--timesteps", "one"], "--timesteps expects comma-separated numbers (e.g. 999,499; flow pipelines"),
    (EVAL + ["--timesteps", "999.5"], "--timesteps [999.5]: Timesteps must be whole numbers, got 999.5 in [999.5]"),
    (EVAL + ["--timesteps", "499,999"], "--timesteps [499, 999]: Timesteps must be strictly descending"),
    (EVAL + ["--metrics", "fd,bogus"], "Unknown metric(s) ['bogus']"),
    (EVAL + ["--metrics", "fid"], "--metrics fid needs --fid-reference"),
    (EVAL + ["--metrics", "fid", "--fid-reference", "{f}/file.txt"], "file.txt is neither an image folder"),
    (EVAL + ["--metrics", "fid", "--fid-reference", "{f}/missing.npz"], "missing.npz does not exist"),
    pytest.param(EVAL + ["--metrics", "fid", "--fid-reference", "{f}/stats.npz"], "Inception weights", marks=[
        pytest.mark.skipif(Path("/tmp/inception-2015-12-05.pt").exists(), reason="the weights are there")]),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "10", "--metrics", "clip", "--clip-model", "nope"],
     "Unknown open_clip model 'nope'"),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "10", "--metrics", "clip"],
     "open_clip weights for model 'ViT-B-32' with pretrained='openai' are not available"),
    (["eval", "fmnist-ldm", "--steps", "1", "--num-images", "10", "--metrics", "clip", "--clip-model", "RN50",
      "--clip-pretrained", "no-such-tag"], "open_clip has no pretrained tag 'no-such-tag' for 'RN50'"),
    (EVAL + ["--metrics", "clip"], "--metrics clip needs a text-to-image pipeline"),
    (["eval", "fmnist-ldm", "--timesteps", "1000,499", "--metrics", "speed", "--num-images", "2"],
     "--timesteps [1000, 499]: Timesteps [1000] are out of range [0, 999]"),
    (["eval", "fmnist-ldm", "--timesteps", "999,499", "--solver", "unipc", "--metrics", "speed"],
     "--timesteps: solver 'unipc' takes no explicit timesteps"),
    (["eval", "digits-ddpm", "--steps", "1", "--out", "{f}/file.txt"], "file.txt is an existing file"),
    (["eval", "digits-ddpm", "--steps", "1", "--out", "/proc/fastgen-eval"], "/proc/fastgen-eval cannot be written"),
    (["eval", "/no/such/pipeline", "--steps", "1"], "'/no/such/pipeline' is neither a zoo teacher"),
    (["eval", "{f}/unrelated", "--steps", "1"], "unrelated' is not a diffusers pipeline folder"),
    (["eval", "{f}/pickled", "--steps", "1", "--metrics", "speed"], "loads only safetensors weights"),
    (["eval", "fmnist-ldm", "--num-images", "10", "--metrics", "fd"], "fmnist-ldm is not a fastgen student: give"),
    # bench: every check before the first row
    (BENCH + ["--solvers", "ddim,bogus"], "--solvers: unknown solver(s) 'bogus'"),
    (BENCH + ["--nfes", "0"], "--nfes must be positive step counts, got [0]"),
    (BENCH + ["--nfes", "one"], "--nfes expects comma-separated whole numbers, got 'one'"),
    (BENCH + ["--students", "/no/such/student"], "/no/such/student has no model_index.json"),
    (BENCH + ["--students", "{teacher}"], "has no fastgen metadata"),
    (BENCH + ["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (BENCH + ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["bench", "digits-ddpm", "--num-images", "5", "--out", "{new}"], "at least 10 images needed, got --num-images 5"),
    (["bench", "digits-ddpm", "--num-images", "10", "--out", "{f}/file.txt"], "file.txt is an existing file"),
    (["bench", "{teacher}", "--num-images", "10", "--metrics", "fd,recall", "--out", "{new}"],
     "fd, recall use the zoo's data and domain classifiers"),
    # the zoo: never the shipped weights by default, settings checked first
    (["zoo", "train", "digits-ddpm", "--train-steps", "0", "--out", "{new}"], "--train-steps must be >= 1, got 0"),
    (["zoo", "train", "digits-ddpm", "--batch-size", "0", "--out", "{new}"], "--batch-size must be >= 1, got 0"),
    (["zoo", "train", "fmnist-ldm", "--vae-train-steps", "0", "--out", "{new}"], "--vae-train-steps must be >= 1, got 0"),
    (["zoo", "train", "digits-ddpm", "--vae-train-steps", "5", "--out", "{new}"],
     "--vae-train-steps applies to fmnist-ldm only"),
    (["zoo", "train", "digits-ddpm", "--seed", "-1", "--out", "{new}"], "--seed must be >= 0"),
    (["zoo", "train", "digits-ddpm", "--train-steps", "0"], "--train-steps must be >= 1, got 0"),
    (["zoo", "train", "digits-ddpm", "--out", "{new}", "--replace-installed"], "Give --out or --replace-installed"),
    (["zoo", "train", "nope", "--out", "{new}"], "Unknown zoo teacher 'nope'"),
    (["zoo", "train", "digits-ddpm", "--out", "{f}/file.txt"], "file.txt is an existing file"),
    (["zoo", "train", "digits-ddpm", "--out", "{f}/unrelated"], "unrelated already exists and holds no model_index"),
    (["zoo", "card", "digits-ddpm", "--out", "{f}/empty_dir"], "empty_dir has no training_log.json"),
    (["zoo", "card", "nope", "--out", "{f}/empty_dir"], "Unknown zoo teacher 'nope'"),
    (["zoo", "card", "digits-ddpm", "--out", "{f}/empty_dir", "--replace-installed"], "Give --out or --replace-installed"),
    (["zoo", "path", "nope"], "Unknown zoo teacher 'nope'"),
    (["classifier", "digits", "--out", "{new}", "--replace-installed"], "Give --out or --replace-installed, not both"),
    (["classifier", "digits", "--epochs", "0", "--out", "{new}"], "--epochs must be >= 1, got 0"),
    (["demo", "--train-steps", "0", "--out", "{new}"], "--train-steps must be >= 1"),
    (["demo", "--train-steps", "2", "--out", "{new}", "--prompts", "/no/prompts.txt"],
     "Prompt file '/no/prompts.txt' not found"),
    # export: a run's student without training
    (["export", "/no/such/run"], "/no/such/run is neither a run folder"),
    (["export", "{f}/empty_dir"], "empty_dir is neither a run folder"),
    (["export", "{f}/no_checkpoint"], "no_checkpoint holds no complete checkpoint"),
    (["export", "{run}", "--out", "{f}/file.txt"], "file.txt is an existing file"),
    (["export", "{run}", "--out", "{f}/unrelated"], "unrelated already exists and holds no model_index.json"),
    (["export", "{run}", "--teacher", "{f}/other", "--out", "{new}"], "export: the teacher"),
    (["export", "{run}", "--teacher", "/no/such/teacher", "--out", "{new}"], "'/no/such/teacher' is neither a zoo"),
    # --resume CHECKPOINT
    (RESUME + ["--resume", "{f}/empty_dir"], "empty_dir: not a complete checkpoint"),
    (RESUME + ["--resume", "{run}/checkpoints/checkpoint-0000004"],
     "--resume checkpoint-0000004: the run holds later checkpoints (checkpoint-0000006)"),
    (["train", "{recipe}", "--teacher", "{teacher}", "--out", "{new}", "--resume",
      "{run}/checkpoints/checkpoint-0000006"], "is not a checkpoint of the run in {new}"),
    (TRAIN + ["--train-steps", "0"], "steps must be >= 1"),
    # --prompts and --fid-reference of the commands that sample
    (EVAL + ["--prompts", "/no/prompts.txt"], "Prompt file '/no/prompts.txt' not found"),
    (EVAL + ["--prompts", "{f}/binary.txt"], "binary.txt' is not UTF-8 text"),
    (EVAL + ["--prompts", "{f}/prompts.txt", "--metrics", "speed"], "--prompts: DDPMPipeline is unconditional"),
    (BENCH + ["--prompts", "{f}/empty.txt"], "No prompts in"),
    (EVAL + ["--metrics", "fid", "--fid-reference", "cifar10"], "needs its resolution (and split)"),
    (EVAL + ["--metrics", "fid", "--fid-reference", "cifar10:32px"], "a clean-fid dataset is NAME:RES[:SPLIT]"),
    pytest.param(EVAL + ["--metrics", "fid", "--fid-reference", "cifar10:32"],
                 "clean-fid statistics cifar10_clean_train_32.npz for dataset 'cifar10' are missing", marks=[
        pytest.mark.skipif(Path(clean_fid_stats_dir(), "cifar10_clean_train_32.npz").exists(), reason="it is there")]),
]


def _fill(arg: str, paths: dict) -> str:
    return arg.format(**paths)


def _case_id(case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(argv[:1] + argv[-2:])


@pytest.mark.parametrize("argv, message", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(argv, message, recipe, teacher, whole, files, root,
                                                          tmp_path, capsys):
    paths = {"recipe": recipe, "teacher": teacher, "run": whole, "new": tmp_path / "new", "f": files}
    argv = [_fill(a, paths) for a in argv]
    watched = (whole, tmp_path / "new", files, teacher, ZOO)
    before = snapshot(*watched)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"fastgen {argv[0]}: error: "), err
    assert _fill(message, paths) in lines[0]
    assert "Traceback" not in err
    assert snapshot(*watched) == before


def test_bad_input_from_the_installed_command_is_one_line(recipe, tmp_path):
    """The console entry point itself (a fresh process): exit 2, one line on stderr, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "fastgen.cli", "train", str(recipe), "--out", str(tmp_path / "x"),
                           "--set", "train.grad_accum=0"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "grad_accum must be >= 1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()


# --- bad input through the Python API -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pipes(teacher):
    return {"ddpm": DDPMPipeline.from_pretrained(teacher), "sd": DiffusionPipeline.from_pretrained(ZOO / "fmnist-ldm")}


API_CASES = [
    ("sampler", "sd", {"prompts": []}, "prompts is empty"),
    ("sampler", "ddpm", {"batch_size": -1}, "batch_size must be a positive integer (or pass prompts), got -1"),
    ("sampler", "ddpm", {"batch_size": 0}, "batch_size must be a positive integer (or pass prompts), got 0"),
    ("sampler", "ddpm", {"batch_size": 2, "timesteps": [999.5]}, "Timesteps must be whole numbers, got 999.5"),
    ("sampler", "ddpm", {"batch_size": 2, "timesteps": [499, 999]}, "strictly descending"),
    ("sampler", "sd", {"prompts": ["a photo of a bag"], "guidance_scale": -1.0}, "guidance_scale must be a finite"),
    ("sampler", "sd", {"prompts": ["a photo of a bag"], "guidance_scale": float("nan")}, "guidance_scale must be"),
    ("export", "sd", {"model": "digits"}, "is a UNet2DModel, but StableDiffusionPipeline's unet is a "
                                          "UNet2DConditionModel: it comes from another teacher"),
    ("export", "sd", {"model": "cond16"}, "cross_attention_dim 16 (the teacher's: 64)"),
    ("export", "ddpm", {"model": "rgb"}, "in_channels 3 (the teacher's: 1)"),
    ("export", "ddpm", {"guidance_scale": -2.0}, "guidance_scale must be a finite number >= 0"),
    ("export", "ddpm", {"timesteps": [999.5]}, "Timesteps must be whole numbers"),
    ("export", "ddpm", {"out": "unrelated"}, "holds no model_index.json"),
]


@pytest.mark.parametrize("kind, pipe_name, kwargs, message", API_CASES,
                         ids=[f"{k}-{p}-{'-'.join(kw)}" for k, p, kw, _ in API_CASES])
def test_python_api_bad_input_is_one_line(kind, pipe_name, kwargs, message, pipes, files, tmp_path):
    from fastgen.pipelines.export import export_student
    from fastgen.pipelines.generate import PipelineSampler

    pipe = pipes[pipe_name]
    before = snapshot(files)
    with pytest.raises(ValueError) as err:
        if kind == "sampler":
            PipelineSampler(pipe)(**kwargs)
        else:
            models = {"digits": tiny_unet(), "cond16": tiny_cond_unet(), "rgb": tiny_unet(prediction_channels=3)}
            kwargs = dict(kwargs)
            model = models.get(kwargs.pop("model", None))
            out = files / kwargs.pop("out") if "out" in kwargs else tmp_path / "student"
            export_student(pipe, out, model=model, **{"timesteps": [999], **kwargs})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert snapshot(files) == before and not (tmp_path / "student").exists()


# --- no silent NaN ----------------------------------------------------------------------------------
def nan_teacher(monkeypatch, method_cls, from_step: int, rows=None):
    """Make the run's teacher network output NaN from iteration ``from_step`` on (in all rows, or in ``rows``)."""
    original = method_cls.training_step

    def training_step(self, batch, step):
        if not hasattr(self, "nan_from"):
            def hook(_module, _args, output):
                if not self.poisoned:
                    return output
                sample = output.sample.clone()
                sample[rows if rows is not None else slice(None)] = float("nan")
                return type(output)(sample=sample)

            self.teacher.model.register_forward_hook(hook)
            self.nan_from = from_step
        self.poisoned = step >= self.nan_from
        return original(self, batch, step)

    monkeypatch.setattr(method_cls, "training_step", training_step)


def test_a_nan_teacher_stops_the_run_keeping_the_last_good_checkpoint(recipe, teacher, whole, tmp_path, monkeypatch):
    """DMD2's loss has no nan_to_num: the NaN reaches the loss, the run stops naming the step, before any
    backward or checkpoint; rotation keeps the good checkpoints and no student is exported."""
    nan_teacher(monkeypatch, DMD2, from_step=4)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"at step 5: dm = nan.*last good checkpoint is .*checkpoint-0000004"):
        run_training(str(recipe), ["dmd2.ratio=2"], teacher=str(teacher), out=str(out))
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-0000002", "checkpoint-0000004"]
    good = load_file(str(checkpoints / "checkpoint-0000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (out / "student").exists() and not (out / "train_log.json").exists()


def test_sid_masks_non_finite_samples_and_stops_when_all_are(recipe, teacher, tmp_path, monkeypatch):
    """SiD's documented exception: samples with NaN are masked out of the loss and counted (masked_g); the
    run goes on. A batch masked whole gives a NaN loss, which stops the run like any other."""
    common = ["method=sid", "train.checkpoint_every=0", "train.log_every=1", "student.ema_decay=0"]
    nan_teacher(monkeypatch, SiD, from_step=2, rows=0)
    run_training(str(recipe), common, teacher=str(teacher), out=str(tmp_path / "some"))
    history = json.loads((tmp_path / "some" / "train_log.json").read_text())["history"]
    masked = [round(h["masked_g"], 4) for h in history]
    assert masked[:2] == [0, 0] and masked[2] == 0.1 and all(m > 0 for m in masked[2:])  # smoothed: 0.1 * 1
    monkeypatch.undo()
    nan_teacher(monkeypatch, SiD, from_step=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 3: sid = nan"):
        run_training(str(recipe), common, teacher=str(teacher), out=str(tmp_path / "all"))
    assert not (tmp_path / "all" / "student").exists()


def test_non_finite_weights_are_never_checkpointed(recipe, teacher, tmp_path, monkeypatch):
    """Weights that an optimizer step made non-finite although loss and gradients were finite stop the run at
    the next checkpoint, which would otherwise rotate the good ones out."""
    step_of, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = step_of(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # the generator's update at iteration 2 (ratio 2: generator at 0 and 2, critic at each)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(NonFiniteLossError, match=r"Non-finite weights at step 3: generator weights = nan.*"
                                                 r"last good checkpoint is .*checkpoint-0000002"):
        run_training(str(recipe), ["dmd2.ratio=2", "train.checkpoint_every=1"], teacher=str(teacher),
                     out=str(tmp_path / "w"))
    checkpoints = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-0000001", "checkpoint-0000002"]


# --- exports and finished runs ------------------------------------------------------------------------
def test_resuming_a_finished_run_exports_again(recipe, teacher, whole, tmp_path, capsys):
    run = tmp_path / "finished"
    shutil.copytree(whole, run)
    log = (run / "train_log.json").read_text()
    assert main(["train", str(recipe), "--teacher", str(teacher), "--out", str(run), "--resume",
                 "--set", "dmd2.ratio=2"]) == 0
    assert "trained 0 steps; wrote" in capsys.readouterr().out
    assert (run / "train_log.json").read_text() == log  # the run's own log is kept
    assert_same_weights(whole, run)


# --- kill -9 ------------------------------------------------------------------------------------------
# A child `fastgen train` that SIGKILLs itself at a chosen point (FASTGEN_TEST_KILL): no handler runs, as
# with `kill -9` from outside, but the point is exact. "pause" instead sleeps at step 3 for the test to kill.
CHILD = r"""
import os, signal, sys, time
import torch, safetensors.torch
where = os.environ["FASTGEN_TEST_KILL"]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where.startswith("checkpoint:"):  # inside the write of checkpoint N: its model is written, its optimizers not
    tag, save = ".tmp-checkpoint-%07d" % int(where.split(":")[1]), torch.save
    torch.save = lambda obj, f, *a, **k: die() if tag in str(f) else save(obj, f, *a, **k)
elif where == "export":  # inside the export: the student's weights are being written to the temporary folder
    save_file = safetensors.torch.save_file
    def save_or_die(tensors, f, *a, **k):
        return die() if "/.tmp-student-" in str(f) else save_file(tensors, f, *a, **k)
    safetensors.torch.save_file = save_or_die
elif where == "swap":  # between the export's two renames: the old student moved aside, the new not yet in place
    replace = os.replace
    def replace_or_die(src, dst):
        return die() if str(dst).endswith("/student") and ".tmp-student-" in str(src) else replace(src, dst)
    os.replace = replace_or_die
elif where == "pause":
    from fastgen.methods import DMD2
    step_of = DMD2.training_step
    def training_step(self, batch, step):
        if step == 3:
            open(os.environ["FASTGEN_TEST_PAUSED"], "w").write(str(os.getpid()))
            time.sleep(600)
        return step_of(self, batch, step)
    DMD2.training_step = training_step
from fastgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child(where: str, recipe, teacher, out, *extra, paused: Path | None = None, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FASTGEN_TEST_KILL": where,
           "FASTGEN_TEST_PAUSED": str(paused or "")}
    argv = [sys.executable, "-c", CHILD, "train", str(recipe), "--teacher", str(teacher), "--out", str(out),
            "--set", "dmd2.ratio=2", *extra]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    return proc


def assert_same_weights(a: Path, b: Path) -> None:
    """The final checkpoints and the exported students of two runs are bit-equal."""
    for rel in (f"checkpoints/checkpoint-{STEPS:07d}/model.safetensors",
                "student/unet/diffusion_pytorch_model.safetensors"):
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
    assert (b / "student" / "model_index.json").is_file() and (b / "student" / "README.md").is_file()
    assert not list(b.glob(".tmp-*")) + list(b.glob(".old-*")) + list((b / "checkpoints").glob(".tmp-*"))


def resume(recipe, teacher, out):
    return run_training(str(recipe), ["dmd2.ratio=2"], teacher=str(teacher), out=str(out), resume=True)


def test_kill_9_during_a_checkpoint_write_then_resume(recipe, teacher, whole, tmp_path, one_thread):
    out = tmp_path / "ckpt"
    child("checkpoint:4", recipe, teacher, out)
    partial = out / "checkpoints" / ".tmp-checkpoint-0000004"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-0000002"
    resume(recipe, teacher, out)
    assert_same_weights(whole, out)


def test_kill_9_during_the_export_and_between_its_renames_then_resume(recipe, teacher, whole, tmp_path, one_thread):
    out = tmp_path / "export"
    child("export", recipe, teacher, out, "--set", "train.checkpoint_every=4")
    assert not (out / "student").exists() and len(list(out.glob(".tmp-student-*"))) == 1
    # the last step is checkpointed although 4 does not divide it: the export can be redone from it
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000004", f"checkpoint-{STEPS:07d}"]
    resume(recipe, teacher, out)
    assert_same_weights(whole, out)
    # a finished run re-exported (--resume), killed between the renames: the old student aside, the new one complete
    child("swap", recipe, teacher, out, "--resume")
    assert not (out / "student").exists()
    assert len(list(out.glob(".old-student-*"))) == 1 and len(list(out.glob(".tmp-student-*"))) == 1
    resume(recipe, teacher, out)
    assert_same_weights(whole, out)


def test_kill_9_in_training_while_a_second_process_is_refused(recipe, teacher, whole, tmp_path, one_thread, capsys):
    out, paused = tmp_path / "train", tmp_path / "paused"
    proc = child("pause", recipe, teacher, out, paused=paused, wait=False)
    try:
        deadline = time.time() + 300
        while not paused.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert paused.exists(), proc.communicate()[1][-2000:]
        before = snapshot(out)
        for extra in ([], ["--resume"]):  # a second run on the folder, fresh or resuming, is refused
            argv = ["train", str(recipe), "--teacher", str(teacher), "--out", str(out), "--set", "dmd2.ratio=2", *extra]
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert f"is in use by process {proc.pid} on " in err and len(err.splitlines()) == 1
        assert snapshot(out) == before
    finally:
        proc.kill()  # SIGKILL
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-0000002"
    resume(recipe, teacher, out)  # the kernel released the dead process's lock
    assert_same_weights(whole, out)
