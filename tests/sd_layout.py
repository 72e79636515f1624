"""Test-side writer of the ORIGINAL Stable Diffusion 1.x single-file layout from diffusers/transformers
modules.

Written independently of minidiff.io.weights (prefix tables built by walking the block structure, the way the
CompVis UNetModel constructor counts its blocks) and proved by test_unet.py: a round trip through diffusers'
own single-file conversion (diffusers.loaders.single_file_utils) gives back every tensor unchanged.
Shared by the tests of U1 (UNet), S (pipelines), P1 (plugins) and U2 (VAE) to build original-layout files.

    unet_to_original(state_dict, layers_per_block) -> CompVis names (no prefix)
    original_to_unet(state_dict, layers_per_block) -> diffusers names (the inverse; no diffusers import)
    vae_to_original(state_dict, levels) -> CompVis VAE names (no prefix; proved by test_vae.py)
    original_state_dict(unet=, vae=, text_encoder=) -> full single-file dict with the three prefixes
    write_original_single_file(path, unet=, vae=, text_encoder=)
        .safetensors, or .ckpt ({"state_dict": ...})
"""
import re

import torch

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = ("model.diffusion_model.", "first_stage_model.",
                                       "cond_stage_model.transformer.")
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_prefixes(keys, layers_per_block):
    """diffusers module prefix -> CompVis module prefix, for the blocks present in `keys`."""
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    L = layers_per_block
    table = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    n = 1  # input_blocks counter, as the CompVis constructor appends them
    b = 0
    while has(f"down_blocks.{b}."):
        for j in range(L):
            table[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{n}.0."
            table[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{n}.1."
            n += 1
        if has(f"down_blocks.{b}.downsamplers."):
            table[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{n}.0.op."
            n += 1
        b += 1
    table.update({"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                  "mid_block.resnets.1.": "middle_block.2."})
    n = 0  # output_blocks counter
    b = 0
    while has(f"up_blocks.{b}."):
        attn = has(f"up_blocks.{b}.attentions.")
        for j in range(L + 1):
            table[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{n}.0."
            table[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{n}.1."
            n += 1
        # the Upsample sits after the last ResBlock (+ SpatialTransformer) of the block
        table[f"up_blocks.{b}.upsamplers.0."] = f"output_blocks.{n - 1}.{2 if attn else 1}."
        b += 1
    return table


def _rename(key, table, resnet_map):
    prefix = max((p for p in table if key.startswith(p)), key=len)
    rest = key[len(prefix):]
    if ".resnets." in prefix:
        name, leaf = rest.split(".", 1)
        rest = f"{resnet_map.get(name, name)}.{leaf}"
    return table[prefix] + rest


def unet_to_original(dsd, layers_per_block):
    """Diffusers UNet2DConditionModel state dict -> CompVis UNetModel names (tensors shared, not copied)."""
    table = _unet_prefixes(list(dsd), layers_per_block)
    return {_rename(k, table, RESNET): v for k, v in dsd.items()}


def original_to_unet(osd, layers_per_block, attention_blocks, blocks):
    """CompVis names -> diffusers names (for unit tests without diffusers): the inverse of the prefix table of
    a UNet with `blocks` down/up blocks, attention in down blocks `attention_blocks` (mirrored in the up
    blocks)."""
    fake = ["conv_in.", "mid_block."]
    for b in range(blocks):
        fake.append(f"down_blocks.{b}.")
        fake.append(f"up_blocks.{b}.")
        if b < blocks - 1:
            fake.append(f"down_blocks.{b}.downsamplers.")
        if blocks - 1 - b in attention_blocks:
            fake.append(f"up_blocks.{b}.attentions.")
    inverse = {v: k for k, v in _unet_prefixes(fake, layers_per_block).items()}
    # the last up block has no Upsample; its slot name would collide with a real module
    inverse = {k: v for k, v in inverse.items() if not v.startswith(f"up_blocks.{blocks - 1}.upsamplers")}
    back = {v: k for k, v in RESNET.items()}
    out = {}
    for key, t in osd.items():
        prefix = max((p for p in inverse if key.startswith(p)), key=len)
        rest = key[len(prefix):]
        if prefix.endswith(".0.") and ("input_blocks" in prefix or "output_blocks" in prefix) or prefix in (
                "middle_block.0.", "middle_block.2."):
            m = re.match(r"(in_layers\.\d|out_layers\.\d|emb_layers\.\d|skip_connection)\.(.*)", rest)
            if m:
                rest = f"{back[m[1]]}.{m[2]}"
        out[inverse[prefix] + rest] = t
    return out


def vae_to_original(dsd, levels):
    """Diffusers AutoencoderKL state dict -> original CompVis VAE names (no prefix; tensors shared). U2's
    writer, independent of minidiff.io.weights.vae_from_diffusers; proved by test_vae.py's round trip through
    diffusers."""
    out = {}
    for key, t in dsd.items():
        part, rest = key.split(".", 1)  # encoder / decoder / quant_conv / post_quant_conv
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", rest):
            i, kind, j, tail = m.groups()
            rest = f"down.{i}.block.{j}.{tail}" if kind == "resnets" else f"down.{i}.downsample.{tail}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", rest):
            i, kind, j, tail = m.groups()
            level = levels - 1 - int(i)  # diffusers counts from the lowest resolution, CompVis by level
            rest = f"up.{level}.block.{j}.{tail}" if kind == "resnets" else f"up.{level}.upsample.{tail}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
            name, leaf = m[1].rsplit(".", 1)
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[name]
            rest = f"mid.attn_1.{name}.{leaf}"
            if t.ndim == 2:
                t = t[:, :, None, None]  # Linear -> 1x1 conv
        rest = rest.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[f"{part}.{rest}" if part in ("encoder", "decoder") else key] = t
    return out


def original_state_dict(unet=None, vae=None, text_encoder=None):
    """The single-file dict (`model.diffusion_model.*`, `first_stage_model.*`,
    `cond_stage_model.transformer.*`) of a diffusers UNet2DConditionModel, a diffusers AutoencoderKL and a
    transformers CLIPTextModel."""
    out = {}
    if unet is not None:
        sd = unet_to_original(unet.state_dict(), unet.config.layers_per_block)
        out.update({UNET_PREFIX + k: v for k, v in sd.items()})
    if vae is not None:
        sd = vae_to_original(vae.state_dict(), len(vae.config.block_out_channels))
        out.update({VAE_PREFIX + k: v for k, v in sd.items()})
    if text_encoder is not None:
        sd = dict(text_encoder.state_dict())
        # the published SD 1.x files still carry this (then persistent) buffer; loaders must ignore it
        positions = text_encoder.config.max_position_embeddings
        sd.setdefault("text_model.embeddings.position_ids", torch.arange(positions)[None])
        out.update({TEXT_PREFIX + k: v for k, v in sd.items()})
    return out


def write_original_single_file(path, unet=None, vae=None, text_encoder=None):
    """Write the original SD 1.x single file: .safetensors, or a Lightning-style .ckpt {"state_dict": ...}."""
    sd = {k: v.detach().contiguous() for k, v in original_state_dict(unet, vae, text_encoder).items()}
    if str(path).endswith(".ckpt"):
        torch.save({"state_dict": sd}, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    return path
