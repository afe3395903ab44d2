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

from torch import nn

# Attention projections plus the ResNet convolutions and time projections: on tiny UNets the
# attention layers alone hold too few parameters to distill into.
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2",
                        "time_emb_proj", "conv_shortcut")


def tuner_layers(model: nn.Module):
    """peft's LoRA layers inside ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(model: nn.Module, adapter_name: str, rank: int = 8, alpha: float | None = None,
             target_modules=DEFAULT_UNET_TARGETS, init_lora_weights: bool | str = True) -> None:
    """Add a LoRA adapter named ``adapter_name`` to a diffusers model and freeze the base weights.

    Args:
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha`` (default: ``rank``, i.e. scale 1).
        target_modules: module name suffixes to adapt.
        init_lora_weights: peft's option; ``True`` starts as the identity (B = 0), ``False`` random.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init_lora_weights,
                        target_modules=list(target_modules))
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
        model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: config}
    set_active_adapter(model, adapter_name)
    for param in lora_parameters(model, adapter_name):
        param.requires_grad_(True)


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

    Adapters other than the active one keep ``requires_grad`` as they are (peft's ``set_adapter``
    would switch it on for the active one and off for the rest).
    """
    for layer in tuner_layers(model):
        if adapter_name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
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
