"""The trainer: runs any :class:`~fastgen.methods.DistillationMethod` on accelerate.

One process on CPU here; on GPUs, DDP (and friends) through ``accelerate launch`` and the user's
accelerate config -- the trainer only calls ``Accelerator``. With several processes each one runs
the method on its own batch and noise (the runner seeds them apart; the global batch is
``batch_size x processes``), DDP averages the gradients, the logged losses are means over processes,
and only the main process evaluates and writes files other than accelerate's own.

The trainer owns what no method should: one AdamW optimizer per optimizer group the method declares
(:meth:`~fastgen.methods.DistillationMethod.parameter_groups`, configured by
:class:`~fastgen.methods.OptimizerOptions`) with a warm-up schedule (then constant, or decaying linearly to 0
in each round), the update schedule the method asks for (each iteration updates exactly the groups whose
losses :meth:`training_step` returned, then calls the method's ``end_step``, e.g. a target network's EMA),
training rounds (optimizers and schedules restart at each), gradient accumulation, mixed precision,
gradient clipping, an optional EMA of the method's ``ema_group`` (diffusers' ``EMAModel``), a
progress bar with the current losses, accelerate trackers, periodic evaluation, and checkpoints:

* every ``checkpoint_every`` steps, and at the last step, ``accelerator.save_state`` writes into
  ``.tmp-checkpoint-N``, which is then renamed to ``checkpoint-N`` -- a kill never leaves a half-written
  checkpoint, and leftover temporary folders are ignored and removed on resume. The method's whole state
  is stored but its frozen teacher base (:meth:`~fastgen.methods.DistillationMethod.frozen_base`,
  reloaded from the teacher's folder): trained weights, target networks, buffers
  (``model.safetensors``); the EMA and the data stream (``trainer_state.safetensors``); step and update
  counts (``trainer_state.json``, written last); and accelerate's own pickles: optimizers
  (``optimizer*.bin``), schedulers (``scheduler*.bin``) and each process's RNG states
  (``random_states_<i>.pkl``), which accelerate loads with ``torch.load(weights_only=True)``.
  Non-finite trained weights are never checkpointed.
* ``train(resume=True)`` continues from the latest checkpoint, which must hold exactly the tensors
  this run's method has (with their shapes); the run then ends with the same weights as an
  uninterrupted one. Resuming a complete run trains nothing (the caller exports again).
* A non-finite loss or gradient norm stops training with an error naming the step and the value; no
  backward or checkpoint happens after it, so the last good checkpoint stays.
* Under DDP the search for unused parameters runs only for methods whose iterations leave some
  trained parameter without gradient (:meth:`~fastgen.methods.DistillationMethod.uses_all_parameters_every_step`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from fastgen.methods.base import DistillationMethod, OptimizerOptions

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRACKERS_FILE = "trackers.json"  # the tracker run of a run folder (wandb's run id), continued on resume
# Trackers that get each evaluation's sample grid, with the keywords of their ``log_images`` for one
# ``[1, H, W, C]`` uint8 array (accelerate's trackers differ in the layout they expect).
IMAGE_TRACKERS = {"tensorboard": {"dataformats": "NHWC"}, "wandb": {}}


class NonFiniteLossError(RuntimeError):
    """A loss (or gradient norm) became NaN or infinite."""


@dataclass
class TrainerConfig:
    """Options of the training loop.

    Args:
        steps: iterations (each runs ``grad_accum`` micro-batches).
        grad_accum: gradient accumulation micro-batches per iteration.
        mixed_precision: ``None`` (accelerate's config: ``accelerate launch --mixed_precision`` or the
            ``ACCELERATE_MIXED_PRECISION`` it sets; else ``"no"``), ``"no"``, ``"bf16"`` or ``"fp16"``
            (accelerate's autocast; fp16 adds a grad scaler). The precision in force is ``summary()["mixed_precision"]``.
        max_grad_norm: clip each group's gradient norm to this (0: no clipping).
        ema_decay: EMA of the weights of the method's ``ema_group`` (0: none); the EMA weights are
            evaluated and exported.
        checkpoint_every: write a checkpoint every this many steps (0: never).
        keep_checkpoints: how many recent checkpoints to keep.
        log_every: log smoothed losses to the trackers every this many steps.
        eval_every: call the evaluation callback every this many steps (0: never).
        trackers: accelerate trackers, e.g. ``["tensorboard"]`` or ``["wandb"]`` (none by default).
        progress: show a tqdm progress bar.
        seed: recorded in the log (the runner seeds before building the method).
    """

    steps: int = 1000
    grad_accum: int = 1
    mixed_precision: str | None = None
    max_grad_norm: float = 10.0
    ema_decay: float = 0.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int = 0
    trackers: list[str] = field(default_factory=list)
    progress: bool = True
    seed: int = 0


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``folder`` (temporary folders are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def _cumulative(round_steps: list[int], total: int) -> list[int]:
    """The step at which each round ends (``[500, 1000]`` for rounds of 500 and 500); they must add up to ``total``."""
    if not round_steps or any(n < 1 for n in round_steps) or sum(round_steps) != total:
        raise ValueError(f"The method's rounds {round_steps} must be positive step counts adding up to train.steps = "
                         f"{total}.")
    ends, done = [], 0
    for n in round_steps:
        done += n
        ends.append(done)
    return ends


def _warmup(steps: int) -> Callable[[int], float]:
    return lambda i: min(1.0, (i + 1) / steps) if steps > 0 else 1.0


def _lr_factor(options: OptimizerOptions, round_length: Callable[[], int]) -> Callable[[int], float]:
    """The learning-rate factor after ``i`` updates of a group in the current round: the warm-up, then constant or
    (``decay = "linear"``) falling linearly to 0 at ``round_length()`` updates."""
    warmup = _warmup(options.warmup_steps)
    if options.decay == "constant":
        return warmup
    return lambda i: warmup(i) * max(0.0, 1.0 - i / round_length())


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (``resource`` is Unix-only: on Windows psutil's peak working
    set; ``None`` where neither tells)."""
    try:
        import resource
    except ImportError:
        import psutil

        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
        return peak / 2**20 if peak is not None else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024.0)


class Trainer:
    """Train ``method`` with one optimizer per :meth:`parameter_groups` entry.

    Args:
        method: the distillation method (an ``nn.Module``; calling it runs one training step).
        out_dir: run folder; checkpoints go to ``out_dir/checkpoints``, logs to ``out_dir/logs``.
        config: :class:`TrainerConfig`.
        optimizers: :class:`~fastgen.methods.OptimizerOptions` per optimizer group (missing groups get
            the method's ``optimizer_defaults``); a group the method does not train is an error.
        evaluate: optional ``fn(step) -> dict of metrics``, called every ``eval_every`` steps and at
            the end (inside :meth:`student_weights`, so with the EMA weights when there is an EMA).
        tracker_config: hyper-parameters to record with the trackers.
    """

    def __init__(self, method: DistillationMethod, out_dir: str | Path, config: TrainerConfig | None = None,
                 optimizers: dict[str, OptimizerOptions] | None = None,
                 evaluate: Callable[[int], dict] | None = None, tracker_config: dict | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        self.config = config or TrainerConfig()
        self.find_unused_parameters = not method.uses_all_parameters_every_step()
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.evaluate = evaluate
        trackers = list(self.config.trackers)
        for name in trackers:
            _check_tracker(name)
        self.accelerator = Accelerator(
            mixed_precision=self.config.mixed_precision, gradient_accumulation_steps=self.config.grad_accum,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.out_dir), logging_dir=str(self.out_dir / "logs")),
            # DDP searches the autograd graph for unused parameters after every backward only when some
            # iteration leaves a group without gradient (e.g. the generator on DMD2's critic-only iterations)
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters)])
        self.method = method
        self.groups = method.parameter_groups()
        unknown = set(optimizers or {}) - set(self.groups)
        if unknown:
            raise KeyError(f"Optimizer settings for {sorted(unknown)}, but method {method.name!r} trains "
                           f"{', '.join(self.groups)}.")
        defaults = type(method).optimizer_defaults
        opt_cfg = {name: (optimizers or {}).get(name) or defaults.get(name) or OptimizerOptions() for name in self.groups}
        self.optimizers = {name: torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), eps=c.eps,
                                                   weight_decay=c.weight_decay)
                           for (name, params), c in zip(self.groups.items(), opt_cfg.values())}
        self.round_ends = _cumulative(method.rounds(self.config.steps), self.config.steps)
        self.round_length = self.round_ends[0]  # steps of the round in progress (linear learning-rate decay)
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(
                               opt, _lr_factor(opt_cfg[name], lambda: self.round_length))
                           for name, opt in self.optimizers.items()}
        self.on_round_end: Callable[[int, int], None] | None = None  # fn(round, step), e.g. export that round's student
        acc = self.accelerator
        self.model = acc.prepare(method)
        names = list(self.optimizers)
        prepared = acc.prepare(*self.optimizers.values(), *self.schedulers.values())
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        self.optimizers = dict(zip(names, prepared[:len(names)]))
        self.schedulers = dict(zip(names, prepared[len(names):]))
        self.ema, self.ema_group = None, method.ema_group
        if self.config.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            if self.ema_group not in self.groups:
                raise ValueError(f"An EMA was asked for (ema_decay {self.config.ema_decay}), but method {method.name!r} "
                                 "names no optimizer group to keep it of.")
            self.ema = EMAModel(self.groups[self.ema_group], decay=self.config.ema_decay)
        self.batches = None  # the data stream of train(), checkpointed with the EMA in TRAINER_TENSORS
        acc.register_save_state_pre_hook(self._keep_method_state)
        self.update_counts = {name: 0 for name in self.groups}
        self.train_seconds = 0.0  # time spent in training iterations (not evaluation or checkpoints), over resumes
        self.tracker_config = tracker_config or {}
        self.history: list[dict] = []

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # --- checkpoints ----------------------------------------------------------------------
    def _checkpoint_names(self, state: dict) -> list[str]:
        """The names of ``state`` (the method's state dict) that a checkpoint holds: every tensor but the
        frozen teacher base, each storage once (modules shared by several roles appear under several names)."""
        base = {t.data_ptr() for t in self.method.frozen_base()}
        picked, seen = [], set()
        for key, tensor in state.items():
            ptr = tensor.data_ptr()
            if ptr not in base and ptr not in seen:
                picked.append(key)
                seen.add(ptr)
        return picked

    def _keep_method_state(self, models, weights, output_dir):
        """accelerate save hook: store the method's state but the frozen teacher base (reloaded from its folder)."""
        for i, state in enumerate(weights):
            keep = set(self._checkpoint_names(state))
            weights[i] = {k: v.contiguous() for k, v in state.items() if k in keep}

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` atomically (temporary folder, then rename) and prune old ones.

        Trained weights that are not finite are never checkpointed (rotation would delete the last good
        checkpoint): that stops training with :class:`NonFiniteLossError`."""
        acc = self.accelerator
        for name, params in self.groups.items():
            bad = next((p.detach()[~torch.isfinite(p.detach())] for p in params if not torch.isfinite(p).all()), None)
            if bad is not None:
                self._check_finite({f"{name} weights": float(bad[0])}, step - 1, "weights")
        final = self.checkpoint_dir / f"checkpoint-{step:07d}"
        tmp = self.checkpoint_dir / f".tmp-checkpoint-{step:07d}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process has written its RNG state before the rename
        if acc.is_main_process:
            self._save_trainer_tensors(tmp / TRAINER_TENSORS)
            state = {"step": step, "update_counts": self.update_counts, "time": time.time(),
                     "train_seconds": self.train_seconds}
            (tmp / STATE_FILE).write_text(json.dumps(state))  # written last: it marks the checkpoint complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            done = sorted((int(m.group(1)), p) for p in self.checkpoint_dir.iterdir()
                          if (m := CHECKPOINT_RE.match(p.name)))
            for _, old in done[:-max(1, self.config.keep_checkpoints)]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> int:
        """Restore a checkpoint; returns its step. It must hold exactly this run's method state (names and
        shapes), else a ``RuntimeError`` says what differs."""
        from safetensors import safe_open

        state = self.accelerator.get_state_dict(self.model)  # unwrapped: the names the checkpoint stores
        expected = {k: tuple(state[k].shape) for k in self._checkpoint_names(state)}
        stored = {}
        for file in path.glob("model*.safetensors"):
            with safe_open(str(file), "pt") as f:
                stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
        if missing or unexpected or reshaped:
            parts = [f"{len(missing)} of this run's tensors are missing (e.g. {missing[:2]})" if missing else "",
                     f"{len(unexpected)} are not this run's (e.g. {unexpected[:2]})" if unexpected else "",
                     f"{len(reshaped)} differ in shape (e.g. {reshaped[0]}: {stored[reshaped[0]]} stored, "
                     f"{expected[reshaped[0]]} here)" if reshaped else ""]
            raise RuntimeError(f"Checkpoint {path} does not match this run's method {self.method.name!r}: "
                               + "; ".join(p for p in parts if p) + ". Was it written by another recipe (method, "
                               "LoRA rank, GAN head)?")
        self.accelerator.load_state(str(path), strict=False)  # strict above; the frozen teacher base is not stored
        self._load_trainer_tensors(path)
        info = json.loads((path / STATE_FILE).read_text())
        self.round_length = self._length_of_round(min(int(info["step"]), self.config.steps - 1))
        self.update_counts = dict(info["update_counts"])
        self.train_seconds = float(info.get("train_seconds", 0.0))
        return int(info["step"])

    def _save_trainer_tensors(self, file: Path) -> None:
        """The EMA and the data stream's state as one safetensors file (accelerate would pickle them as
        ``custom_checkpoint_<i>.pkl`` and load those with ``weights_only=False``, i.e. able to run code)."""
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        if self.ema is not None:
            state = self.ema.state_dict()
            tensors.update({f"ema.{i}": t.detach().contiguous() for i, t in enumerate(state.pop("shadow_params"))})
            meta["ema"] = state
        if self.batches is not None:
            tensors.update({f"data.{k}": v.contiguous() for k, v in self.batches.state_dict().items()})
        save_file(tensors, str(file), metadata={"fastgen": json.dumps(meta)})

    def _load_trainer_tensors(self, path: Path) -> None:
        """Restore what :meth:`_save_trainer_tensors` wrote (or, from checkpoints written before it existed,
        accelerate's ``custom_checkpoint_<i>.pkl``, read with ``torch.load(weights_only=True)``)."""
        from safetensors.torch import load_file, safe_open

        file = path / TRAINER_TENSORS
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("fastgen", "{}"))
            tensors = load_file(str(file))
            ema_state = None
            if self.ema is not None:
                shadow = [tensors[f"ema.{i}"] for i in range(sum(k.startswith("ema.") for k in tensors))]
                ema_state = {**meta.get("ema", {}), "shadow_params": shadow}
            data_state = {k[len("data."):]: v for k, v in tensors.items() if k.startswith("data.")}
        else:
            legacy = [torch.load(path / f"custom_checkpoint_{i}.pkl", map_location="cpu", weights_only=True)
                      for i in range(2) if (path / f"custom_checkpoint_{i}.pkl").is_file()]
            if len(legacy) != (self.ema is not None) + (self.batches is not None):
                raise RuntimeError(f"Checkpoint {path} has no {TRAINER_TENSORS} (EMA and data stream state).")
            ema_state = legacy.pop(0) if self.ema is not None else None
            data_state = legacy.pop(0) if self.batches is not None else None
        if self.ema is not None:
            current = self.ema.shadow_params
            shadow = ema_state.get("shadow_params") if ema_state else None
            if shadow is None or [tuple(t.shape) for t in shadow] != [tuple(t.shape) for t in current]:
                raise RuntimeError(f"Checkpoint {path} holds no EMA of this run's {self.ema_group} weights; was it "
                                   "written with another student.ema_decay?")
            ema_state["shadow_params"] = [t.to(c.device, c.dtype) for t, c in zip(shadow, current)]
            self.ema.load_state_dict(ema_state)
        if self.batches is not None:
            self.batches.load_state_dict(data_state)

    def _restart_group(self, name: str) -> None:
        """A new round: forget the optimizer's moments and restart its learning-rate schedule."""
        optimizer, scheduler = self.optimizers[name], self.schedulers[name]
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.state.clear()
        lr_schedule = getattr(scheduler, "scheduler", scheduler)
        lr_schedule.last_epoch = 0
        for group, base, fn in zip(inner.param_groups, lr_schedule.base_lrs, lr_schedule.lr_lambdas):
            group["lr"] = base * fn(0)

    def round_of(self, step: int) -> int:
        """The training round that iteration ``step`` belongs to."""
        return next(i for i, end in enumerate(self.round_ends) if step < end)

    def _length_of_round(self, step: int) -> int:
        """The number of steps of the round that iteration ``step`` belongs to."""
        r = self.round_of(step)
        return self.round_ends[r] - (self.round_ends[r - 1] if r else 0)

    # --- EMA ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def student_weights(self):
        """Inside the block the student carries its EMA weights (if any); restored afterwards."""
        if self.ema is None:
            yield
            return
        params = self.groups[self.ema_group]
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # --- the loop -------------------------------------------------------------------------
    def _check_finite(self, values: dict[str, float], step: int, what: str = "loss"):
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            last = latest_checkpoint(self.checkpoint_dir)
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            names = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise NonFiniteLossError(
                f"Non-finite {what} at step {step + 1}: {names}. Training stopped; {keep} "
                f"(resume from it with a lower learning rate, or check the data / mixed precision).")

    def _run_eval(self, step: int) -> None:
        if self.evaluate is None or not self.accelerator.is_main_process:
            return
        with torch.random.fork_rng(devices=[]), self.student_weights():  # evaluation must not change training RNG
            metrics = self.evaluate(step)
        record = {"step": step, "train_s": round(self.train_seconds, 2), **metrics}
        with open(self.out_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if metrics.get("samples"):
            self._log_grid(self.out_dir / metrics["samples"], step)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in metrics.items()))

    def train(self, batches, resume: bool = False, checkpoint: Path | None = None) -> dict:
        """Run to ``config.steps``; returns a summary (also written to ``out_dir/train_log.json``, whose logged
        history of the steps before a resume is kept).

        Call :meth:`end` when done with the trained method (after exporting it).

        Args:
            batches: an iterator of :class:`~fastgen.methods.Batch` with ``state_dict`` /
                ``load_state_dict`` (e.g. :class:`fastgen.train.data.BatchStream`); it is checkpointed.
            resume: continue from ``checkpoint``, by default the latest in ``out_dir/checkpoints``.
            checkpoint: the checkpoint folder to resume from.
        """
        acc, cfg = self.accelerator, self.config
        self.batches = batches
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume:
            last = checkpoint or latest_checkpoint(self.checkpoint_dir)
            if last is None:
                raise FileNotFoundError(f"--resume: no complete checkpoint in {self.checkpoint_dir}.")
            start = self.load_checkpoint(last)
            tqdm.write(f"resumed from {last} (step {start})")
            self.history = [r for r in self._logged_history() if r.get("step", 0) <= start]
            if acc.is_main_process:
                self._drop_evaluations_after(start)
        if acc.is_main_process and self.checkpoint_dir.is_dir():
            for leftover in self.checkpoint_dir.glob(".tmp-checkpoint-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        if cfg.trackers:
            acc.init_trackers("fastgen", config={k: v for k, v in self.tracker_config.items()
                                                 if isinstance(v, (int, float, str, bool))},
                              init_kwargs=self._tracker_kwargs(start))
        if start >= cfg.steps:
            tqdm.write(f"the run is complete (step {start} of train.steps = {cfg.steps}): nothing left to train")
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=start, desc="training", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_local_main_process))
        smooth: dict[str, float] = {}
        begin, step_times = time.perf_counter(), []
        for step in range(start, cfg.steps):
            if step > 0 and step in self.round_ends[:-1]:  # a round ends: its student, then a fresh optimizer
                finished = self.round_ends.index(step)
                if self.on_round_end is not None and acc.is_main_process:
                    with torch.random.fork_rng(devices=[]), self.student_weights():
                        self.on_round_end(finished, step)
                self.round_length = self._length_of_round(step)
                for name in self.optimizers:
                    self._restart_group(name)
                self.method.begin_round(finished + 1)
            tick = time.perf_counter()
            for _ in range(cfg.grad_accum):
                with acc.accumulate(self.model):
                    out = self.model(next(batches), step)
                    values = torch.stack([v.float() for v in out.logs.values()] +
                                         [v.float().detach() for v in out.losses.values()])
                    # the mean over processes: every process logs, and stops on a non-finite loss, alike
                    values = acc.reduce(values, "mean").tolist()
                    names = list(out.logs) + [f"{k} (total)" for k in out.losses]
                    logged = dict(zip(names, values))
                    self._check_finite(logged, step)
                    acc.backward(sum(out.losses.values()))
            for name in out.losses:  # the groups this iteration updates, in the method's order
                params = self.groups[name]
                if cfg.max_grad_norm > 0:
                    acc.unscale_gradients(self.optimizers[name])
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    if acc.mixed_precision != "fp16":  # fp16: the grad scaler skips inf steps itself
                        self._check_finite({f"{name} gradient norm": float(norm)}, step, "gradient")
                self.optimizers[name].step()
                self.schedulers[name].step()
                self.optimizers[name].zero_grad(set_to_none=True)
                self.update_counts[name] += 1
            if self.ema is not None and self.ema_group in out.losses:
                self.ema.step(self.groups[self.ema_group])
            self.method.end_step(step)
            step_times.append(time.perf_counter() - tick)
            self.train_seconds += step_times[-1]
            for k, v in logged.items():
                if "(total)" not in k:
                    smooth[k] = v if k not in smooth else 0.9 * smooth[k] + 0.1 * v
            done = step + 1
            bar.update(1)
            if done % 10 == 0 or done == cfg.steps:
                bar.set_postfix({k: f"{v:.4g}" for k, v in smooth.items()}, refresh=False)
            if cfg.log_every and done % cfg.log_every == 0:
                record = {"step": done, **{k: float(f"{v:.6g}") for k, v in smooth.items()},
                          "s_per_step": sum(step_times[-cfg.log_every:]) / len(step_times[-cfg.log_every:])}
                self.history.append(record)
                acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=done)
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                self.save_checkpoint(done)  # the last step too: a kill during the export is then redone by --resume
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                self._run_eval(done)
        bar.close()
        wall = time.perf_counter() - begin
        if cfg.eval_every and not self._evaluated(cfg.steps):
            self._run_eval(cfg.steps)
        summary = self.summary(start, wall, step_times)
        log = self.out_dir / "train_log.json"
        if acc.is_main_process and (step_times or not log.is_file()):  # a complete run's resume keeps its log
            log.write_text(json.dumps(summary, indent=1))
        return summary

    def _tracker_kwargs(self, start: int) -> dict:
        """accelerate's ``init_kwargs`` that make a resumed run continue its tracker run: TensorBoard writes into
        the same ``logs/fastgen`` folder and hides what a killed run logged after its checkpoint (``purge_step``:
        the steps after ``start``); wandb resumes the run id stored in ``trackers.json`` (``resume="allow"``)."""
        kwargs: dict = {}
        if "tensorboard" in self.config.trackers and start > 0:
            kwargs["tensorboard"] = {"purge_step": start + 1}
        if "wandb" in self.config.trackers:
            import wandb

            path = self.out_dir / TRACKERS_FILE
            stored = json.loads(path.read_text()) if path.is_file() else {}
            if not stored.get("wandb_id"):
                stored["wandb_id"] = wandb.util.generate_id()
                if self.accelerator.is_main_process:
                    path.write_text(json.dumps(stored))
            kwargs["wandb"] = {"id": stored["wandb_id"], "resume": "allow", "name": self.out_dir.name,
                               "dir": str(self.out_dir / "logs")}
        return kwargs

    def _log_grid(self, path: Path, step: int) -> None:
        """Log an evaluation's sample grid (a PNG) to the trackers that take images."""
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))[None]
        for name, kwargs in IMAGE_TRACKERS.items():
            if name in self.config.trackers:
                self.accelerator.get_tracker(name).log_images({"eval/samples": image}, step=step, **kwargs)

    def _drop_evaluations_after(self, step: int) -> None:
        """Remove from ``eval.jsonl`` the evaluations a killed run made after the checkpoint it resumes from (the
        resumed run makes them again), as TensorBoard's ``purge_step`` hides its logs."""
        records = self.out_dir / "eval.jsonl"
        if not records.is_file():
            return
        lines = records.read_text().splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(keep) != len(lines):
            tmp = records.with_name(".tmp-eval.jsonl")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, records)

    def _logged_history(self) -> list[dict]:
        """The history of ``out_dir/train_log.json`` (empty when there is none or it is unreadable)."""
        try:
            return list(json.loads((self.out_dir / "train_log.json").read_text()).get("history", []))
        except (OSError, ValueError, AttributeError):
            return []

    def _evaluated(self, step: int) -> bool:
        """Whether ``eval.jsonl`` already ends with the evaluation at ``step`` (a resumed, finished run)."""
        records = self.out_dir / "eval.jsonl"
        lines = records.read_text().splitlines() if records.is_file() else []
        try:
            return bool(lines) and json.loads(lines[-1]).get("step") == step
        except json.JSONDecodeError:
            return False

    def end(self) -> None:
        """Wait for every process, then close the trackers and the process group (call once, after export)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def summary(self, start: int, wall: float, step_times: list[float]) -> dict:
        method = self.accelerator.unwrap_model(self.model)
        stored = {p.data_ptr(): p.numel() for p in method.parameters()}
        steady = step_times[min(len(step_times) // 10, 20):] or step_times
        return {"method": method.name, "config": asdict(self.config),
                "mixed_precision": self.accelerator.mixed_precision, "start_step": start,
                "steps_run": len(step_times), "wall_s": wall,
                "ddp_find_unused_parameters": self.find_unused_parameters,
                "s_per_step": (sum(steady) / len(steady)) if steady else None,
                "update_counts": self.update_counts,
                "parameters_stored": sum(stored.values()),
                "parameters_trained": {k: sum(p.numel() for p in v) for k, v in self.groups.items()},
                "peak_rss_mb": _peak_rss_mb(), "threads": torch.get_num_threads(), "history": self.history}


def _check_tracker(name: str) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
    if module is None:
        return  # another accelerate tracker: accelerate validates it
    if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        raise ValueError(f"Tracker {name!r} is not installed; `pip install {module}` (or `pip install fastgen-diffusion[tracking]`), "
                         f"or leave train.trackers empty.")


__all__ = ["Trainer", "TrainerConfig", "NonFiniteLossError", "latest_checkpoint"]
