"""The contract every distillation method fulfils, and the options all of them share.

A method is one ``nn.Module`` subclass of :class:`DistillationMethod`, registered by name with
:func:`register`. It holds everything it trains and declares everything the engine needs, so that
the runner (:mod:`fastgen.train.runner`) and the trainer (:mod:`fastgen.train.trainer`) name no
method:

* its **options** -- ``Options``, a dataclass that is its recipe section ``[<name>]`` (with a
  ``validate()`` that raises a one-line ``ValueError``), plus the shared sections it reads
  (``sections``: always ``[student]``, ``[critic]`` for methods with the fake-score critic);
* its **data needs** -- :meth:`data_needs`: real images, teacher ODE pairs (prompts come with every
  text-conditional teacher);
* its **optimizer groups** -- :meth:`parameter_groups`, with per-group defaults in
  ``optimizer_defaults`` (each configurable as ``[optim.<group>]``), and ``ema_group``, the group
  whose EMA the trainer keeps, evaluates and exports;
* its **state** -- everything in its ``state_dict()`` but the frozen teacher base
  (:meth:`frozen_base`): trained weights, target networks, buffers such as a round counter. The
  trainer checkpoints all of it and resumes strictly;
* its **export spec** -- :meth:`export_spec`: sampler, timesteps, guidance of the exported call;
* its **rounds** -- :meth:`rounds` / :meth:`begin_round` (one round by default);
* its **timesteps** and cross-section checks -- :meth:`recipe_timesteps`, :meth:`check_recipe`;
* what follows each update -- :meth:`end_step` (e.g. a target network's EMA).

:meth:`DistillationMethod.training_step` runs one iteration and returns the loss of every
optimizer group to update now, so one engine runs DMD2's two time-scale rule, SiD's alternation or
a target-network update.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import ClassVar, Iterable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from fastgen.checks import check_choice
from fastgen.denoiser import DEFAULT_EMBEDDED_GUIDANCE, Conditioning, Denoiser
from fastgen.guidance_embedding import guidance_conditioned_network
from fastgen.lora import AdapterDenoiser, add_lora, base_copy, lora_parameters
from fastgen.schedule import schedule_timesteps

from .common import backward_simulation, straight_through_clip


def option(default, help: str):
    """A dataclass field with a default and its help text (shown by ``fastgen train --help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def option_default(f):
    """The default value of a dataclass field made by :func:`option`."""
    return f.default if f.default is not MISSING else f.default_factory()


# --- what a training iteration gets and returns ----------------------------------------------
@dataclass
class Batch:
    """One training batch; every field but ``size`` is optional.

    Args:
        size: number of student samples to generate.
        cond: conditioning of the prompts (``None`` for unconditional teachers).
        uncond: conditioning of the empty prompt, one row per sample (teacher guidance).
        real: real samples in the network's space (latents for latent models), for GAN losses.
        real_cond: the real samples' conditioning.
        pair_noise: noise of cached teacher ODE pairs (DMD's regression loss) ...
        pair_target: ... the teacher's deterministic sample from that noise ...
        pair_cond: ... and its conditioning.
    """

    size: int
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    real: torch.Tensor | None = None
    real_cond: Conditioning | None = None
    pair_noise: torch.Tensor | None = None
    pair_target: torch.Tensor | None = None
    pair_cond: Conditioning | None = None

    def to(self, device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if f.name != "size" and getattr(self, f.name) is not None})


@dataclass
class StepOutput:
    """The result of one training iteration.

    Args:
        losses: optimizer group -> scalar loss to minimise with that group's optimizer; only the
            groups updated this iteration appear. The losses of different groups have disjoint
            gradients, so the trainer backpropagates their sum once.
        logs: named loss terms (detached) for the progress bar and trackers.
    """

    losses: dict[str, torch.Tensor]
    logs: dict[str, torch.Tensor]


# --- what a method declares -----------------------------------------------------------------
@dataclass
class TeacherPairs:
    """Cached teacher ODE pairs (noise -> the teacher's deterministic sample), e.g. DMD's regression data.

    Args:
        count: number of pairs, generated once and cached in the run folder.
        steps: DDIM steps of the teacher's sampler.
        guidance_scale: the teacher's guidance when sampling them.
        batch_size: pairs per training batch.
    """

    count: int
    steps: int
    guidance_scale: float | None
    batch_size: int


@dataclass
class DataNeeds:
    """What a method needs besides noise (text-conditional teachers always get prompts).

    Args:
        real: real samples (an image folder or the zoo's dataset, set by ``data.real``).
        teacher_pairs: cached teacher ODE pairs, or ``None``.
        why_real: what needs the real images (said in the error when ``data.real`` is missing).
        without_real: the recipe setting that trains without them, where one does (said in that error too).
    """

    real: bool = False
    teacher_pairs: TeacherPairs | None = None
    why_real: str = ""
    without_real: str = ""


@dataclass
class ExportSpec:
    """How the exported folder must sample the student.

    Args:
        method: name recorded in the folder's metadata and model card.
        sampler: ``"multistep"`` (x0 then re-noise; LCMScheduler) or ``"ddim"`` (DDIMScheduler, trailing).
        timesteps: the trained descending timesteps (whole numbers for VP teachers, ``t = sigma T`` for flow ones).
        guidance_scale: the guidance of the exported call (0: guidance distilled in; for a guidance-conditioned
            student, the ``W`` its embedding is fed).
        scheduler_config: overrides of the exported scheduler's config, e.g. the student's ``prediction_type``
            when it differs from the teacher's, or LCMScheduler's ``timestep_scaling``.
    """

    method: str
    sampler: str
    timesteps: list
    guidance_scale: float = 0.0
    scheduler_config: dict = field(default_factory=dict)


LR_DECAYS = ("constant", "linear")


@dataclass
class OptimizerOptions:
    """AdamW of one optimizer group, with a linear warm-up to a constant learning rate. Recipe: ``[optim.<group>]``.

    Args:
        lr: learning rate after warm-up.
        betas: Adam's ``(beta1, beta2)``.
        weight_decay: decoupled weight decay (0: plain Adam).
        eps: Adam's epsilon.
        warmup_steps: updates *of this group* over which the rate rises linearly from 0.
        decay: ``"constant"`` after warm-up, or ``"linear"``: decays linearly to 0 at the end of each training
            round (in the group's updates since the round began; progressive distillation's schedule).
    """

    lr: float = option(5e-5, "learning rate after warm-up")
    betas: list = option([0.9, 0.999], "Adam betas [beta1, beta2]")
    weight_decay: float = option(0.01, "decoupled weight decay (0: plain Adam)")
    eps: float = option(1e-8, "Adam epsilon")
    warmup_steps: int = option(500, "linear warm-up, in updates of this group")
    decay: str = option("constant", "'constant' after warm-up, or 'linear': to 0 at the end of each training round")

    def validate(self) -> None:
        check_choice("decay", self.decay, LR_DECAYS)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}.")
        if self.weight_decay < 0 or self.eps <= 0 or self.warmup_steps < 0:
            raise ValueError(f"weight_decay and warmup_steps must be >= 0 and eps > 0, got {self.weight_decay}, "
                             f"{self.warmup_steps}, {self.eps}.")


@dataclass
class StudentOptions:
    """The student network and its steps. Recipe: ``[student]``."""

    num_steps: int = option(1, "student sampling steps; timesteps = fastgen.pipelines.sampler.student_timesteps("
                               "schedule, num_steps), e.g. [999, 749, 499, 249] for 4 (VP teachers), the "
                               "teacher's shifted sigmas times T for flow teachers")
    timesteps: list = option([], "explicit descending timesteps: whole numbers in [0, T-1] for VP teachers, "
                                 "t = sigma T in (0, T] for flow teachers (SD3, Flux); num_steps must then equal "
                                 "their number "
                                 "(set student.timesteps=[] to let num_steps choose them)")
    lora_rank: int = option(0, "0: full copy of the teacher network; > 0: LoRA adapter 'student' of this rank on "
                               "the frozen teacher")
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    lora_targets: list = option([], "module name suffixes the student's LoRA adapter adapts ([]: fastgen.lora."
                                    "default_targets: attention, ResNet convolutions and time projections of a "
                                    "UNet); a list replaces the defaults, so list them too and add e.g. "
                                    "'ff.net.0.proj', 'ff.net.2' (the transformer blocks' feed-forward), 'conv' "
                                    "(down/upsamplers), 'conv_in', 'conv_out'")
    ema_decay: float = option(0.0, "EMA decay of the student's weights per update (0: no EMA); the EMA is evaluated "
                                   "and exported; diffusers' EMAModel ramps it in as min(ema_decay, (1 + n) / (10 + n)) "
                                   "at update n, so 0.99 holds from update ~890 and 0.998 from ~4490")
    init: str = option("", "'' (the teacher's network), or an exported student folder (a run's student/, or a run "
                           "folder: its student/) whose network the student starts from, e.g. a SiD student for "
                           "SiDA fine-tuning (SiD^2A); same network class and config as the student; the critic "
                           "still starts from the teacher; full-weight students only")

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}.")
        if self.timesteps:  # whole numbers or not, and their range, depend on the teacher's schedule (VP or flow):
            ts = self.timesteps  # the runner checks those (fastgen.schedule.schedule_timesteps)
            bad = [t for t in ts if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                   or t < 0]
            if bad:
                raise ValueError(f"timesteps = {ts}: each must be a number >= 0, got {bad[0]!r}.")
            if any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"timesteps = {ts}: Timesteps must be strictly descending, got {ts}.")
            if self.num_steps != len(self.timesteps):  # never silently ignore one of the two
                raise ValueError(f"num_steps = {self.num_steps}, but timesteps = {self.timesteps} are "
                                 f"{len(self.timesteps)}; set student.timesteps=[] to let num_steps choose them, or "
                                 f"num_steps = {len(self.timesteps)}.")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError(f"lora_rank and lora_alpha must be >= 0, got {self.lora_rank} and {self.lora_alpha}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if any(not isinstance(t, str) or not t for t in self.lora_targets):
            raise ValueError(f"lora_targets = {self.lora_targets}: each must be a module name suffix such as "
                             "'to_q' or 'ff.net.2'.")
        if self.lora_targets and not self.lora_rank:
            raise ValueError(f"lora_targets = {self.lora_targets} adapts a LoRA student, but lora_rank = 0 (a full "
                             "copy): set lora_rank > 0 or lora_targets = [].")
        if self.init and self.lora_rank:
            raise ValueError(f"init = {self.init!r} starts a full-weight student; a LoRA student (lora_rank = "
                             f"{self.lora_rank}) cannot start from it, as an exported folder holds the fused network, "
                             "which cannot be split into the teacher's base and an adapter: set lora_rank = 0.")


# --- shared helpers ---------------------------------------------------------------------------
@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]):
    """Temporarily stop gradients to ``params`` (gradients still flow *through* the network to its input)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_student(teacher: Denoiser, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets=None, adapter_name: str = "student",
                 guidance_dim: int | None = None) -> Denoiser:
    """The student network, initialised from the teacher.

    ``lora_rank=0``: a full trainable copy of the teacher network. ``lora_rank > 0``: a LoRA adapter
    ``adapter_name`` on the teacher's own network (frozen base; the teacher runs with adapters disabled).
    ``guidance_dim``: a full copy that also takes the guidance scale (diffusers' ``time_cond_proj_dim``
    embedding of this width; :mod:`fastgen.guidance_embedding`), starting as the teacher.
    """
    if guidance_dim is not None:
        if lora_rank > 0:
            raise ValueError("A guidance-conditioned student is a full copy of the teacher network (its guidance "
                             "embedding is a new layer a LoRA adapter cannot add): set student.lora_rank = 0.")
        return Denoiser(guidance_conditioned_network(teacher.model, guidance_dim), teacher.schedule,
                        teacher.sample_size)
    if lora_rank > 0:
        add_lora(teacher.model, adapter_name, rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
        return AdapterDenoiser(teacher.model, teacher.schedule, adapter_name, teacher.sample_size)
    return Denoiser(base_copy(teacher.model), teacher.schedule, teacher.sample_size)


def network_config(network: nn.Module) -> dict:
    """A diffusers network's config as saved in its ``config.json`` (without the ``_`` bookkeeping keys)."""
    import json

    config = {k: v for k, v in dict(network.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(config, default=str))  # tuples as lists, as a saved and reloaded config has them


def start_student_from(student: Denoiser, init: Denoiser, what: str = "student.init") -> None:
    """Copy the weights of ``init`` (a trained student: its network and the schedule it was exported with) into
    ``student``'s network.

    Both networks must be the same diffusers class with the same config (a guidance-conditioned student's embedding
    included) and output the same parameterisation (``prediction_type``); a one-line ``ValueError`` naming both
    otherwise. ``what`` names the setting in that error.
    """
    network = student.model
    mine, theirs = type(network).__name__, type(init.model).__name__
    if mine != theirs:
        raise ValueError(f"{what}: its network is a {theirs}, but this run's student is a {mine} (the teacher's "
                         "network); start from a student of this teacher.")
    a, b = network_config(network), network_config(init.model)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        shown = ", ".join(f"{k} = {b.get(k)!r} (the student's: {a.get(k)!r})" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        hint = (" A guidance-conditioned student (LCM, guided PD) starts only from a student with the same guidance "
                "embedding, and other students only from students without one." if "time_cond_proj_dim" in differ
                else "")
        raise ValueError(f"{what}: its {theirs} has another config than this run's student {mine}: {shown}{more}."
                         + hint)
    kinds = init.schedule.prediction_type, student.schedule.prediction_type
    if kinds[0] != kinds[1]:
        raise ValueError(f"{what}: its network outputs {kinds[0]!r} (its scheduler's prediction_type), but this run's "
                         f"student outputs {kinds[1]!r}.")
    with torch.no_grad():
        network.load_state_dict(init.model.state_dict())  # strict: every weight of the student comes from init


def student_parameters(student: Denoiser) -> list[nn.Parameter]:
    """The trained parameters of a student from :func:`make_student`."""
    if isinstance(student, AdapterDenoiser) and student.adapter is not None:
        return lora_parameters(student.model, student.adapter)
    return list(student.model.parameters())


# --- the registry -----------------------------------------------------------------------------
METHODS: dict[str, type["DistillationMethod"]] = {}


def register(cls: type["DistillationMethod"]) -> type["DistillationMethod"]:
    """Class decorator: make a method available by its ``name`` to recipes (``method = "<name>"``)."""
    if not getattr(cls, "name", None) or cls.name == DistillationMethod.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered.")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"A method named {cls.name!r} is already registered ({METHODS[cls.name].__name__}).")
    METHODS[cls.name] = cls
    return cls


@dataclass
class NoOptions:
    """A method without options of its own."""


class DistillationMethod(nn.Module):
    """Base class of the methods: a frozen teacher, a student, its sampler, and the contract above.

    Args:
        teacher: the frozen teacher (an :class:`~fastgen.lora.AdapterDenoiser` with ``adapter=None``
            when the student or critic are adapters on its network).
        timesteps: the student's descending network timesteps, e.g. ``[749]`` or ``[999, 749, 499, 249]``
            (:func:`fastgen.pipelines.sampler.student_timesteps` computes the exported scheduler's); continuous
            ``t = sigma T`` for flow teachers, e.g. ``[1000.0, 750.0]``.
        options: this method's ``Options`` (default: its defaults).
        student: the shared student options (network copy or LoRA).
        critic: the shared critic options, for methods whose ``sections`` include ``"critic"``.
        default_guidance: the teacher's recommended guidance, used where an option leaves it unset.
        student_init: a trained student (``student.init``: its network with its exported schedule) whose weights
            the student starts from instead of the teacher's (:func:`start_student_from`), before any other
            network (a target, an EMA) copies it; ``None``: the teacher's.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    sections: ClassVar[tuple[str, ...]] = ("student",)
    optimizer_defaults: ClassVar[dict[str, OptimizerOptions]] = {"generator": OptimizerOptions()}
    ema_group: ClassVar[str | None] = "generator"
    sampler: ClassVar[str] = "multistep"  # x0 then re-noise with fresh noise; exported as LCMScheduler

    def __init__(self, teacher: Denoiser, timesteps: Sequence[int], options=None, student: StudentOptions | None = None,
                 critic=None, default_guidance: float | None = None, student_init: Denoiser | None = None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.student_options = student or StudentOptions()
        for opts in (self.options, self.student_options):
            if hasattr(opts, "validate"):
                opts.validate()
        self.teacher = teacher
        self.schedule = teacher.schedule
        self.timesteps = self.check_timesteps(schedule_timesteps(teacher.schedule, timesteps))
        self.default_guidance = default_guidance
        self.student = self.build_student(teacher, self.student_options)
        if student_init is not None:
            start_student_from(self.student, student_init)
        for name, p in teacher.model.named_parameters():  # the teacher is frozen; adapters on it may train
            if "lora_" not in name:
                p.requires_grad_(False)

    # --- the contract ----------------------------------------------------------------------
    @classmethod
    def check_recipe(cls, options, student: StudentOptions) -> None:
        """Checks that join the method's options and ``[student]`` (each section validates itself first), run
        before anything is loaded; a one-line ``ValueError`` names the keys (default: nothing to check)."""

    @classmethod
    def recipe_timesteps(cls, num_train_timesteps: int, options, student: StudentOptions) -> list[int] | None:
        """The student's timesteps when the method sets them itself (e.g. a grid several rounds share);
        ``None`` (default): ``student.timesteps``, else the exported scheduler's for ``student.num_steps``."""
        return None

    def check_timesteps(self, timesteps: list[int]) -> list[int]:
        """Validate the student's timesteps for this method (e.g. one step only); returns them."""
        return timesteps

    def build_student(self, teacher: Denoiser, opts: StudentOptions) -> Denoiser:
        """The student network, initialised from the teacher (a full copy or a LoRA adapter)."""
        return make_student(teacher, opts.lora_rank, opts.lora_alpha or None, opts.lora_targets or None)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trained parameters per optimizer group (the keys of ``optimizer_defaults``)."""
        return {"generator": student_parameters(self.student)}

    def data_needs(self) -> DataNeeds:
        """What the runner must build besides prompts (default: nothing)."""
        return DataNeeds()

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        """One iteration (``step`` counts from 0): the losses of the groups to update now."""
        raise NotImplementedError

    def uses_all_parameters_every_step(self) -> bool:
        """Whether every iteration's losses reach every trained parameter. Data-parallel training then skips
        DDP's search for unused parameters (a traversal of the autograd graph after every backward); a wrong
        ``True`` makes DDP fail at the next iteration, so the default is ``False``."""
        return False

    def forward(self, batch: Batch, step: int) -> StepOutput:
        return self.training_step(batch, step)

    def export_spec(self) -> ExportSpec:
        """How the exported folder samples the student."""
        return ExportSpec(self.name, self.sampler, list(self.timesteps), self.exported_guidance(0.0))

    def exported_guidance(self, guidance_scale: float) -> float:
        """The exported call's guidance: ``guidance_scale``, except for a student that embeds guidance (Flux's
        ``guidance_embeds``): the pipeline then feeds its ``guidance_scale`` to the network, and it must be the
        value the student was trained with (:data:`~fastgen.denoiser.DEFAULT_EMBEDDED_GUIDANCE`)."""
        return DEFAULT_EMBEDDED_GUIDANCE if self.student.embeds_guidance else guidance_scale

    def rounds(self, total_steps: int) -> list[int]:
        """Steps of each training round (default: one round of ``total_steps``). The trainer restarts the
        optimizers and learning-rate schedules at every round and calls :meth:`begin_round`."""
        return [total_steps]

    def begin_round(self, index: int) -> None:
        """Called when round ``index`` >= 1 begins, after the previous round's student was exported (default:
        nothing to do). Not called on resume: keep what a round changes in the method's state (buffers,
        modules), which checkpoints restore."""

    def end_step(self, step: int) -> None:
        """Called after every iteration's optimizer updates (and the trainer's EMA), before a checkpoint is
        written: e.g. a consistency model's target network follows the student here (default: nothing)."""

    def frozen_base(self) -> list[torch.Tensor]:
        """The teacher's frozen base weights and buffers: the only state a checkpoint leaves out (the
        teacher is reloaded from its folder). LoRA adapters on the teacher network are not part of it."""
        model = self.teacher.model
        return [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" not in n]

    @property
    def student_adapter(self) -> str | None:
        """The student's adapter name when it is a LoRA student (export fuses it), else ``None``."""
        return self.student.adapter if isinstance(self.student, AdapterDenoiser) else None

    # --- the student's sampler ---------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.teacher.latent_shape

    def student_x0(self, x_t: torch.Tensor, t, cond: Conditioning | None = None) -> torch.Tensor:
        """The student's output as x0, clipped like the exported scheduler when the teacher clips
        (straight-through: :func:`~fastgen.methods.common.straight_through_clip`)."""
        return straight_through_clip(self.student(x_t, t, cond).x0, self.schedule.clip_sample_range)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pure noise at ``timesteps[0]``: the generator's input."""
        param = next(self.student.model.parameters())
        return randn_tensor((n, *self.latent_shape), generator=generator, device=param.device, dtype=param.dtype)

    def simulate(self, noise: torch.Tensor, k: int, cond: Conditioning | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_{t_k}``: the student run through its steps ``0 .. k-1`` from ``noise``
        (:func:`~fastgen.methods.common.backward_simulation`)."""
        return backward_simulation(self.student_x0, self.schedule, noise, self.timesteps, k, cond, generator)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The student's own sampler: x0-then-renoise over all its timesteps (what the export reproduces)."""
        last = len(self.timesteps) - 1
        return self.student_x0(self.simulate(noise, last, cond, generator), self.timesteps[last], cond)


__all__ = ["Batch", "StepOutput", "DataNeeds", "TeacherPairs", "ExportSpec", "OptimizerOptions", "StudentOptions",
           "DistillationMethod", "METHODS", "register", "option", "option_default", "check_choice", "frozen",
           "make_student", "student_parameters", "start_student_from", "network_config", "LR_DECAYS"]
