"""peft LoRA adapters on one frozen base network.

The teacher, the student and the critic can share one copy of the base weights: the teacher is
the base with adapters disabled, the student is adapter ``"student"``, the critic adapter
``"critic"``. diffusers models carry peft adapters natively (``add_adapter`` / ``set_adapter`` /
``disable_adapters``); this module only picks sensible targets and switches between them.
"""

from __future__ import annotations

import contextlib

from torch import nn

# Attention projections plus the ResNet convolutions and time projections: on tiny UNets the
# attention layers alone hold too few parameters to distill into.
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2",
                        "time_emb_proj", "conv_shortcut")


def add_lora(model: nn.Module, adapter_name: str, rank: int = 8, alpha: float | None = None,
             target_modules=DEFAULT_UNET_TARGETS, init_lora_weights: bool | str = True) -> None:
    """Add a LoRA adapter named ``adapter_name`` to a diffusers model and freeze the base weights.

    Args:
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha`` (default: ``rank``, i.e. scale 1).
        target_modules: module name suffixes to adapt.
        init_lora_weights: peft's option; ``True`` starts as the identity (B = 0), ``False`` random.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init_lora_weights,
                        target_modules=list(target_modules))
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=adapter_name)
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name and "lora_" in name:
            param.requires_grad_(True)


def lora_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The trainable parameters of one adapter."""
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter_name: str | None):
    """Run the model as one adapter (``None``: the frozen base, i.e. the teacher), then restore."""
    previous = list(model.active_adapters()) if getattr(model, "_hf_peft_config_loaded", False) else []
    try:
        if adapter_name is None:
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(adapter_name)
        yield model
    finally:
        if previous:
            model.enable_adapters()
            model.set_adapter(previous)
