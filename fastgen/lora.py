"""peft LoRA adapters on one frozen base network.

The teacher, the student and the critic can share one copy of the base weights: the teacher is
the base with adapters disabled, the student is adapter ``"student"``, the critic adapter
``"critic"``. Models with diffusers' ``PeftAdapterMixin`` (``UNet2DConditionModel``,
``SD3Transformer2DModel``) get adapters through their own ``add_adapter``; ``UNet2DModel`` has no
mixin, so adapters are injected with peft's ``inject_adapter_in_model``. Switching works on peft's
tuner layers directly, the same way for both.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

from torch import nn

from .denoiser import Denoiser

# Attention projections plus the ResNet convolutions and time projections: on tiny UNets the
# attention layers alone hold too few parameters to distill into.
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2",
                        "time_emb_proj", "conv_shortcut")


# SD3's joint and Flux's double- and single-stream blocks: the attention projections of both streams, the
# feed-forward layers and Flux's single-block MLP (the targets of diffusers' SD3 / Flux LoRA training scripts).
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The LoRA targets of a network: :data:`TRANSFORMER_TARGETS` for SD3 / Flux transformers (their blocks have
    no convolutions), :data:`DEFAULT_UNET_TARGETS` for UNets."""
    return TRANSFORMER_TARGETS if getattr(model, "transformer_blocks", None) is not None else DEFAULT_UNET_TARGETS


_LAYERS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def tuner_layers(model: nn.Module):
    """peft's LoRA layers inside ``model`` (cached per model until its set of adapters changes:
    walking every module of a UNet costs milliseconds, and training switches adapters per forward)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(getattr(model, "peft_config", {}) or ())
    cached = _LAYERS.get(model)
    if cached is None or cached[0] != key:
        cached = (key, [m for m in model.modules() if isinstance(m, BaseTunerLayer)])
        _LAYERS[model] = cached
    return list(cached[1])


def add_lora(model: nn.Module, adapter_name: str, rank: int = 8, alpha: float | None = None,
             target_modules=None, init_lora_weights: bool | str = True) -> None:
    """Add a LoRA adapter named ``adapter_name`` to a diffusers model and freeze the base weights.

    Adapters added earlier keep their ``requires_grad`` flags (peft would freeze every adapter but
    the newest), so a student and a critic adapter can be added in either order.

    Args:
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha`` (default: ``rank``, i.e. scale 1).
        target_modules: module name suffixes to adapt (default: :func:`default_targets`).
        init_lora_weights: peft's option; ``True`` starts as the identity (B = 0), ``False`` random.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = default_targets(model) if target_modules is None else target_modules
    if target_modules is not None:  # peft adapts whatever matches; a misspelt suffix would silently adapt less
        names = [n for n, _ in model.named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ValueError(f"LoRA targets {unmatched} match no module of the {type(model).__name__}; module name "
                             f"suffixes such as {', '.join(default_targets(model))}.")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init_lora_weights,
                        target_modules=list(targets))
    earlier = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    with warnings.catch_warnings():  # several adapters on one base is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        if hasattr(model, "add_adapter"):
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
            model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: config}
    set_active_adapter(model, adapter_name)
    for name, param in model.named_parameters():  # base frozen, new adapter trainable, earlier ones as they were
        param.requires_grad_(earlier.get(name, False) if name in earlier else
                             ("lora_" in name and f".{adapter_name}." in name))


def lora_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The trainable parameters of one adapter."""
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model currently runs (``None``: adapters disabled, i.e. the base / teacher)."""
    layers = tuner_layers(model)
    if not layers or layers[0].disable_adapters:
        return None
    active = layers[0].active_adapters
    return active[0] if active else None


def set_active_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Run the model as ``adapter_name`` from now on; ``None`` disables all adapters (the teacher).

    No adapter's ``requires_grad`` changes: peft's ``set_adapter`` and ``enable_adapters`` switch it
    on for the active adapter and off for the rest (``enable_adapters(False)``: off for all), and
    autograd does not accumulate into a parameter whose flag is off when ``backward`` runs -- so a
    teacher evaluation between the student's forward and its backward would silently drop the
    student's gradients. The layers' state is therefore set directly.
    """
    for layer in tuner_layers(model):
        if adapter_name is None:
            layer._disable_adapters = True  # peft's enable_adapters(False) minus its requires_grad changes
        else:
            layer._disable_adapters = False
            layer._active_adapter = [adapter_name]  # peft's set_adapter minus its requires_grad changes


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter_name: str | None):
    """Run the model as one adapter (``None``: the frozen base, i.e. the teacher), then restore."""
    previous = active_adapter(model)
    set_active_adapter(model, adapter_name)
    try:
        yield model
    finally:
        set_active_adapter(model, previous)


def checkpointing_function(model: nn.Module):
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing(...)`` of ``model`` that
    recomputes each checkpointed block in the backward pass as its forward ran: with the adapter active then
    (student, critic and teacher take turns on one base) and with the ``requires_grad`` flags its weights had then
    (SiD's generator loss, DMD2's GAN term run the critic with its weights frozen). diffusers' default recomputes
    with the state at ``backward`` time, i.e. another network: a metadata error from torch when the saved tensors
    differ in shape, silently wrong gradients when they do not. Otherwise diffusers' default,
    ``torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)``."""
    from torch.utils.checkpoint import checkpoint

    @contextlib.contextmanager
    def as_in_forward(adapter: str | None, flags: list):
        now = [(p, p.requires_grad) for p, _ in flags]
        for p, flag in flags:
            p.requires_grad_(flag)
        try:
            with use_adapter(model, adapter) if tuner_layers(model) else contextlib.nullcontext():
                yield
        finally:
            for p, flag in now:
                p.requires_grad_(flag)

    def checkpoint_block(block, *args):
        adapter = active_adapter(model) if tuner_layers(model) else None  # during the block's forward
        flags = [(p, p.requires_grad) for p in block.parameters()] if isinstance(block, nn.Module) else []
        return checkpoint(block.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), as_in_forward(adapter, flags)))

    return checkpoint_block


def base_copy(model: nn.Module) -> nn.Module:
    """A trainable deep copy of the base weights of ``model`` without any adapters (e.g. a full-weight
    critic or student made from a teacher network that already carries adapters)."""
    import copy

    clone = copy.deepcopy(model)
    layers = set(tuner_layers(clone))
    for parent in list(clone.modules()):
        for child_name, child in list(parent.named_children()):
            if child in layers:
                setattr(parent, child_name, child.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in clone.__dict__:
            delattr(clone, attr)
    return clone.requires_grad_(True)


class AdapterDenoiser(Denoiser):
    """A :class:`~fastgen.denoiser.Denoiser` whose network runs as one adapter of a shared base.

    ``adapter=None`` is the base with adapters disabled -- the teacher. Several AdapterDenoisers
    (teacher, ``"student"``, ``"critic"``) can wrap the same network: one copy of the base weights.
    """

    def __init__(self, model: nn.Module, schedule, adapter: str | None = None, sample_size: int | None = None):
        super().__init__(model, schedule, sample_size)
        self.adapter = adapter

    def model_output(self, x_t, t, cond, guidance=None):
        with use_adapter(self.model, self.adapter):
            return super().model_output(x_t, t, cond, guidance)
