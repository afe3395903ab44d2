"""LoRA students on the inference side: fuse into a plain network, or save as a diffusers LoRA file.

* :func:`fuse_student` -- merge one adapter into a copy of the base weights and drop all
  adapters (fuse -> unload), giving a network that ``save_pretrained`` writes as a plain folder.
* :func:`save_lora_weights` -- ``pytorch_lora_weights.safetensors`` that
  ``pipe.load_lora_weights(folder)`` applies to the teacher. The raw peft keys are saved with the
  ``unet.`` prefix together with the adapter metadata: without the metadata ``lora_alpha != r`` is
  lost, and ``convert_state_dict_to_diffusers`` would silently drop attention LoRA when conv
  layers are targeted too, so it is not used.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn


def fuse_student(model: nn.Module, adapter_name: str = "student") -> nn.Module:
    """A copy of ``model`` with ``adapter_name`` merged into its weights and no adapters left.

    Works on every diffusers model, with or without ``PeftAdapterMixin`` (``UNet2DModel`` has none,
    so diffusers' ``fuse_lora`` / ``unload_lora`` cannot be used): each peft layer merges the adapter
    into its base layer, which then replaces it.
    """
    from fastgen.lora import tuner_layers

    fused = copy.deepcopy(model)
    if adapter_name not in getattr(fused, "peft_config", {}):
        raise ValueError(f"The model has no adapter {adapter_name!r}; adapters: {list(getattr(fused, 'peft_config', {}))}.")
    layers = set(tuner_layers(fused))
    for parent in list(fused.modules()):
        for child_name, child in list(parent.named_children()):
            if child in layers:
                child.merge(adapter_names=[adapter_name])
                setattr(parent, child_name, child.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in fused.__dict__:
            delattr(fused, attr)
    fused.requires_grad_(False)
    return fused


def save_lora_weights(pipeline_class, model: nn.Module, out_dir: str | Path, adapter_name: str = "student") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` for ``pipeline_class.load_lora_weights``.

    Args:
        pipeline_class: the teacher's pipeline class (e.g. ``StableDiffusionPipeline``); it must
            have diffusers' LoRA loader (``save_lora_weights``).
        model: the network carrying the adapter.
        adapter_name: which adapter to save.
    """
    from peft.utils import get_peft_model_state_dict

    if not hasattr(pipeline_class, "save_lora_weights"):
        raise TypeError(f"{pipeline_class.__name__} has no LoRA loader; export a fused student instead.")
    config = model.peft_config[adapter_name]
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    metadata = config.to_dict()
    for key, value in metadata.items():  # sets are not JSON-serialisable
        if isinstance(value, set):
            metadata[key] = sorted(value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(out, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    return out
