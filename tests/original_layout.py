"""Write a Stable Diffusion 1.x pipeline as a single-file checkpoint in the original (CompVis LDM) layout.

A test fixture, not part of fastgen: diffusers' library converts only from the original layout
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``), and its reverse script is not importable. Offline there is no real SD
checkpoint to convert, so the tests make a tiny one here: each rule below undoes one rule of those functions
(the block arithmetic follows ``convert_ldm_unet_checkpoint``; the renames are its tables read backwards), and
the tests check the file with diffusers' own converters before they use it.
"""

from __future__ import annotations

import re

import torch

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_CLIP_PREFIX_TO_REMOVE, LDM_UNET_KEY

# ``update_unet_resnet_ldm_to_diffusers``'s renames, backwards
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
# ``update_vae_attentions_ldm_to_diffusers``'s renames, backwards (the original attention uses 1x1 convolutions)
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest: str, pairs) -> str:
    head, _, leaf = rest.rpartition(".")
    for new, old in pairs:
        if head == new or head.startswith(new + "."):
            return old + head[len(new):] + "." + leaf
    return rest


def _convert(state: dict, layers: dict, rules: list, what: str) -> dict[str, torch.Tensor]:
    """``state`` with each key renamed by ``layers`` (one-to-one names) or by the first ``(pattern, rule)`` whose
    pattern matches it whole; ``rule(match, value)`` gives the new key and value."""
    out = {}
    for key, value in state.items():
        if key in layers:
            out[layers[key]] = value
            continue
        for pattern, rule in rules:
            if m := re.fullmatch(pattern, key):
                new, value = rule(m, value)
                break
        else:
            raise KeyError(f"no original-layout rule for {what} key {key!r}")
        out[new] = value
    return out


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    """``UNet2DConditionModel`` weights under ``model.diffusion_model.`` in the LDM ``UNetModel`` layout."""
    per_block = unet.config.layers_per_block + 1

    def block(prefix, index, m, value):  # a resnet (slot 0, renamed) or an attention (slot 1, same names)
        rest = f"0.{_rename(m[4], UNET_RESNET)}" if m[2] == "resnets" else f"1.{m[4]}"
        return f"{prefix}.{index}.{rest}", value

    def upsampler(m, value):  # after the up block's last layer, past its attention if it has one
        b = int(m[1])
        slot = 2 if hasattr(unet.up_blocks[b], "attentions") else 1
        return f"output_blocks.{per_block * b + per_block - 1}.{slot}.conv.{m[2]}", value

    rules = [
        (r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)",
         lambda m, v: block("input_blocks", per_block * int(m[1]) + int(m[3]) + 1, m, v)),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m, v: (f"input_blocks.{per_block * (int(m[1]) + 1)}.0.op.{m[2]}", v)),
        (r"mid_block\.resnets\.(\d+)\.(.+)",
         lambda m, v: (f"middle_block.{2 * int(m[1])}.{_rename(m[2], UNET_RESNET)}", v)),
        (r"mid_block\.attentions\.0\.(.+)", lambda m, v: (f"middle_block.1.{m[1]}", v)),
        (r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)",
         lambda m, v: block("output_blocks", per_block * int(m[1]) + int(m[3]), m, v)),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", upsampler),
    ]
    out = _convert(unet.state_dict(), DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], rules, "UNet")
    return {LDM_UNET_KEY + k: v for k, v in out.items()}


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """``AutoencoderKL`` weights under ``first_stage_model.`` in the LDM ``AutoencoderKL`` layout."""
    num_up = len(vae.config.up_block_types)

    def attention(m, value):  # the original's 1x1 convolutions
        value = value[:, :, None, None] if value.ndim == 2 else value
        return f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}", value

    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m, v: (f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", v)),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda m, v: (f"encoder.down.{m[1]}.downsample.conv.{m[2]}", v)),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m, v: (f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}", v)),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m, v: (f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}", v)),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m, v: (f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", v)),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", attention),
    ]
    out = _convert(vae.state_dict(), DIFFUSERS_TO_LDM_MAPPING["vae"], rules, "VAE")
    return {"first_stage_model." + k.replace("conv_shortcut", "nin_shortcut"): v for k, v in out.items()}


def text_encoder_to_original(text_encoder) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` under ``cond_stage_model.transformer.text_model.``: SD1.x files hold the transformers
    4.x layout of the time (transformers 5 no longer names the ``text_model.`` level in its state dict)."""
    prefix = LDM_CLIP_PREFIX_TO_REMOVE[0]
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


def save_original_sd_checkpoint(pipe, path) -> dict[str, torch.Tensor]:
    """Write ``pipe``'s UNet, VAE and text encoder as one original-layout ``.safetensors`` file; return its tensors."""
    from safetensors.torch import save_file

    state = {**unet_to_original(pipe.unet), **vae_to_original(pipe.vae), **text_encoder_to_original(pipe.text_encoder)}
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(state, str(path))
    return state
