"""Write tiny pipelines as single-file checkpoints in their original (non-diffusers) layouts.

A test fixture, not part of fastgen: diffusers' library converts only from the original layouts
(``diffusers.loaders.single_file_utils``), and its reverse scripts are not importable. Offline there is no real
checkpoint to convert, so the tests make tiny ones here: each writer below undoes one of those converters (named in
its docstring; the renames are their tables read backwards), and the tests check the file with diffusers' own
converters before they use it. :data:`ORIGINAL_LAYOUTS` says which components a family's file holds.
"""

from __future__ import annotations

import re
from functools import partial

import torch

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_CLIP_PREFIX_TO_REMOVE, LDM_UNET_KEY

# ``update_unet_resnet_ldm_to_diffusers``'s renames, backwards
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
# ``update_vae_attentions_ldm_to_diffusers``'s renames, backwards (the original attention uses 1x1 convolutions)
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
# the slices of one fused original tensor (qkv, in_proj; Flux's single-block linear1 = q, k, v and the MLP's input),
# concatenated in this order
FUSED = {"q": 0, "k": 1, "v": 2, "mlp": 3}


def _rename(rest: str, pairs) -> str:
    head, _, leaf = rest.rpartition(".")
    for new, old in pairs:
        if head == new or head.startswith(new + "."):
            return old + head[len(new):] + "." + leaf
    return rest


def _convert(state: dict, layers: dict, rules: list, what: str) -> dict[str, torch.Tensor]:
    """``state`` with each key renamed by ``layers`` (one-to-one names) or by the first rule
    ``(pattern, target[, transform])`` whose pattern matches it whole: ``target`` is a template for
    ``match.expand`` or a function ``(match, value) -> (key, value)``; ``transform`` changes the value. A pattern
    with a group named ``part`` (q, k, v or mlp) matches one slice of a fused original tensor: the slices of one key are
    concatenated along dim 0 in :data:`FUSED` order."""
    out, fused = {}, {}
    for key, value in state.items():
        if key in layers:
            out[layers[key]] = value
            continue
        for pattern, target, *transform in rules:
            if m := re.fullmatch(pattern, key):
                break
        else:
            raise KeyError(f"no original-layout rule for {what} key {key!r}")
        new, value = target(m, value) if callable(target) else (m.expand(target), value)
        value = transform[0](value) if transform else value
        if m.groupdict().get("part"):
            fused.setdefault(new, {})[FUSED[m["part"]]] = value
        else:
            out[new] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def _modules(table) -> list:
    """Rules for whole modules: ``(diffusers module pattern, original module template[, transform])`` rows, each
    applied to the module's weight and bias."""
    return [(rf"{module}\.(?P<leaf>weight|bias)", rf"{original}.\g<leaf>", *transform)
            for module, original, *transform in table]


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """An adaLN projection with its two halves exchanged: the original computes (shift, scale), diffusers'
    ``AdaLayerNormContinuous`` (scale, shift); undoes ``swap_scale_shift``."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    """``UNet2DConditionModel`` weights under ``model.diffusion_model.`` in the LDM ``UNetModel`` layout (SD1.x and
    SDXL's generative-models layout); undoes ``convert_ldm_unet_checkpoint``, SDXL's text-time embedding
    (``add_embedding``) as ``label_emb.0.0`` / ``label_emb.0.2``."""
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
    layers = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if unet.config.addition_embed_type == "text_time":
        layers.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    out = _convert(unet.state_dict(), layers, rules, "UNet")
    return {LDM_UNET_KEY + k: v for k, v in out.items()}


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """``AutoencoderKL`` weights under ``first_stage_model.`` in the LDM ``AutoencoderKL`` layout (SD1.x, SDXL and
    SD3 files alike); undoes ``convert_ldm_vae_checkpoint``."""
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


def text_encoder_to_original(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` under ``prefix`` + ``text_model.``, in the transformers 4.x layout of the time
    (transformers 5 no longer names the ``text_model.`` level in its state dict); undoes
    ``convert_ldm_clip_checkpoint``. SD1.x: ``cond_stage_model.transformer.``; SDXL's first encoder:
    ``conditioner.embedders.0.transformer.``."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


def open_clip_to_original(text_encoder, prefix: str = "conditioner.embedders.1.model.") -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` under ``prefix`` in OpenCLIP's text-tower layout (SDXL's second encoder);
    undoes ``convert_open_clip_checkpoint``: each layer's q, k and v fused into ``attn.in_proj_weight`` /
    ``in_proj_bias``, the projection a plain (width, projection) matrix, the transpose of diffusers' Linear weight."""
    layers = dict(DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"])
    projection = layers.pop("text_projection.weight")
    layer, resblock = r"text_model\.encoder\.layers\.(?P<n>\d+)\.", r"transformer.resblocks.\g<n>."
    rules = [(layer + r"self_attn\.(?P<part>[qkv])_proj\.(?P<leaf>weight|bias)", resblock + r"attn.in_proj_\g<leaf>"),
             (r"text_projection\.weight", projection, torch.t)]
    rules += _modules([(layer + r"self_attn\.out_proj", resblock + "attn.out_proj"),
                       (layer + "layer_norm1", resblock + "ln_1"), (layer + "layer_norm2", resblock + "ln_2"),
                       (layer + r"mlp\.fc1", resblock + "mlp.c_fc"), (layer + r"mlp\.fc2", resblock + "mlp.c_proj")])
    return {prefix + k: v for k, v in _convert(text_encoder.state_dict(), layers, rules, "OpenCLIP").items()}


# a joint (MMDiT / Flux double-stream) block's two streams: diffusers' image-stream module, its text-stream module,
# the original module in SD3 (under ``x_block`` / ``context_block``) and in Flux (after ``img_`` / ``txt_``)
JOINT_STREAMS = [
    (r"attn\.to_(?P<part>[qkv])", r"attn\.add_(?P<part>[qkv])_proj", "attn.qkv", "attn.qkv"),
    (r"attn\.to_out\.0", r"attn\.to_add_out", "attn.proj", "attn.proj"),
    (r"norm1\.linear", r"norm1_context\.linear", "adaLN_modulation.1", "mod.lin"),
    (r"ff\.net\.0\.proj", r"ff_context\.net\.0\.proj", "mlp.fc1", "mlp.0"),
    (r"ff\.net\.2", r"ff_context\.net\.2", "mlp.fc2", "mlp.2"),
]
# the transformers' embedders and final layer: diffusers' module, the original one in SD3 and in Flux (None: the
# family has no such module)[, a transform of the weights]
TRANSFORMER_ENDS = [
    (r"pos_embed\.proj", "x_embedder.proj", None),
    (r"x_embedder", None, "img_in"),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", "time_in.in_layer"),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", "time_in.out_layer"),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", "vector_in.in_layer"),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", "vector_in.out_layer"),
    (r"time_text_embed\.guidance_embedder\.linear_1", None, "guidance_in.in_layer"),  # guidance-distilled Flux
    (r"time_text_embed\.guidance_embedder\.linear_2", None, "guidance_in.out_layer"),
    (r"context_embedder", "context_embedder", "txt_in"),
    (r"proj_out", "final_layer.linear", "final_layer.linear"),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1", _swap_halves),
]


def _ends(family: int) -> list:
    """:data:`TRANSFORMER_ENDS` as ``_modules`` rows for one family (1: SD3, 2: Flux)."""
    return [(row[0], row[family], *row[3:]) for row in TRANSFORMER_ENDS if row[family] is not None]


def sd3_transformer_to_original(transformer) -> dict[str, torch.Tensor]:
    """``SD3Transformer2DModel`` weights under ``model.diffusion_model.`` in the original MMDiT layout of
    sd3_medium.safetensors; undoes ``convert_sd3_transformer_checkpoint_to_diffusers``: each stream's q, k and v
    fused into ``attn.qkv``, and the halves swapped back where diffusers uses ``AdaLayerNormContinuous`` (the final
    layer and the last block's text stream, which has no attention output and no MLP). SD3-medium only: no q/k
    norms, no second attention (SD3.5); a key without a rule raises."""
    last = transformer.config.num_layers - 1
    block, joint = r"transformer_blocks\.(?P<n>\d+)\.", r"joint_blocks.\g<n>."
    table = [(rf"transformer_blocks\.(?P<n>{last})\.norm1_context\.linear",
              joint + "context_block.adaLN_modulation.1", _swap_halves)]
    for image, text, original, _ in JOINT_STREAMS:
        table += [(block + image, joint + "x_block." + original), (block + text, joint + "context_block." + original)]
    rules = _modules(table + _ends(1))
    out = _convert(transformer.state_dict(), {"pos_embed.pos_embed": "pos_embed"}, rules, "SD3 transformer")
    return {LDM_UNET_KEY + k: v for k, v in out.items()}


def flux_transformer_to_original(transformer) -> dict[str, torch.Tensor]:
    """``FluxTransformer2DModel`` weights in Black Forest Labs' layout of flux1-dev.safetensors (no prefix: those
    files hold the transformer alone); undoes ``convert_flux_transformer_checkpoint_to_diffusers``: in each double
    block the streams' q, k and v fused into ``img_attn.qkv`` / ``txt_attn.qkv``, in each single block q, k, v and
    the MLP's input fused into ``linear1`` (that converter splits it at FLUX.1's width, so only a 3072-wide
    transformer converts), the final adaLN's halves swapped back; the q/k RMSNorm weights as ``.scale``."""
    double, d = r"transformer_blocks\.(?P<n>\d+)\.", r"double_blocks.\g<n>."
    single, o = r"single_transformer_blocks\.(?P<n>\d+)\.", r"single_blocks.\g<n>."
    table = [(single + r"norm\.linear", o + "modulation.lin"), (single + "proj_out", o + "linear2")]
    for image, text, _, original in JOINT_STREAMS:
        table += [(double + image, d + "img_" + original), (double + text, d + "txt_" + original)]
    rules = [(single + r"attn\.to_(?P<part>[qkv])\.(?P<leaf>weight|bias)", o + r"linear1.\g<leaf>"),
             (single + r"proj_(?P<part>mlp)\.(?P<leaf>weight|bias)", o + r"linear1.\g<leaf>")]
    norms = [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
             ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")]
    rules += [(double + rf"attn\.{name}\.weight", d + original + ".scale") for name, original in norms]
    rules += [(single + rf"attn\.{name}\.weight", o + original.split(".", 1)[1] + ".scale")
              for name, original in norms[:2]]
    return _convert(transformer.state_dict(), {}, rules + _modules(table + _ends(2)), "Flux transformer")


SD_CLIP = partial(text_encoder_to_original, prefix=LDM_CLIP_PREFIX_TO_REMOVE[0])  # cond_stage_model.transformer.
SDXL_CLIP = partial(text_encoder_to_original, prefix=LDM_CLIP_PREFIX_TO_REMOVE[1])  # conditioner.embedders.0.trans...
# pipeline class -> the components its original single file holds, each with its writer (a loader gives the others
# from elsewhere: real SD3 files such as sd3_medium.safetensors hold the transformer and VAE only)
ORIGINAL_LAYOUTS = {
    "StableDiffusionPipeline": {"unet": unet_to_original, "vae": vae_to_original, "text_encoder": SD_CLIP},
    "StableDiffusionXLPipeline": {"unet": unet_to_original, "vae": vae_to_original, "text_encoder": SDXL_CLIP,
                                  "text_encoder_2": open_clip_to_original},
    "StableDiffusion3Pipeline": {"transformer": sd3_transformer_to_original, "vae": vae_to_original},
    "FluxPipeline": {"transformer": flux_transformer_to_original},
}


def save_original_checkpoint(pipe, path, components=None) -> dict[str, torch.Tensor]:
    """Write ``pipe``'s components (``components``, default: all that :data:`ORIGINAL_LAYOUTS` names for its class)
    as one original-layout ``.safetensors`` file; return its tensors."""
    from safetensors.torch import save_file

    writers = ORIGINAL_LAYOUTS[type(pipe).__name__]
    state = {}
    for name in components or writers:
        state.update(writers[name](getattr(pipe, name)))
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(state, str(path))
    return state
