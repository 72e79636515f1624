"""Reading checkpoints, loading them strictly, and the per-family rename tables, kept as data.

Generic core: read a state dict from .safetensors (lazily, only the keys asked for) or from a pickled
.ckpt/.bin/.pt (torch.load with weights_only=True, memory-mapped), and load it into a module built on the
meta device, so the weights exist once in memory. Then the tables that rename the diffusers VAE/UNet, OpenAI
CLIP `visual.*` and diffusers-named Diff-Plugin SCB layouts to minidiff's names. loading.py builds the models.
"""
import os
import re
import zipfile

import torch
from safetensors import safe_open

from minidiff.errors import CheckpointError  # noqa: F401 (raised here, imported from here)


def _gist(error, limit=160):
    """The telling sentence of a torch.load error, whole words only: for weights_only refusals the
    unpickler's own line ("Unsupported global: ..."), else the first sentence, cut at a word with "..."."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = next((l.split("error:", 1)[1].strip() for l in lines if l.startswith("WeightsUnpickler error:")),
                lines[0])
    text = line.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def as_loaded(t, dtype=None, device=None):
    """A checkpoint tensor as minidiff's models hold it: floating tensors in `dtype` (None: as stored; integer
    buffers keep theirs), on `device` (None: where it is), convolution kernels [O, I, kh, kw] channels-last
    (NHWC strides, same shape): oneDNN on the CPU and cuDNN on the GPU run convolutions fastest in that
    layout, and a conv with a channels-last kernel gives channels-last activations, so every layer after the
    first runs in it (the attention blocks then flatten [B, C, H, W] to [B, H*W, C] for free). Returns `t`
    itself when it already is so."""
    dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
    layout = torch.channels_last if t.dim() == 4 else torch.preserve_format
    return t.to(device=device or t.device, dtype=dtype, memory_format=layout)


# Converting on read maps this much of a .safetensors file at a time (see _read_safetensors).
CAST_WINDOW_BYTES = 64 * 2**20


def _read_safetensors(path, keys, dtype):
    """{key: tensor} of a .safetensors file: as stored, views of the memory-mapped file (dtype None: pages
    are read at first use), or as_loaded(tensor, dtype) in memory of their own.

    safetensors maps the whole file, and every page read through the mapping stays resident until the mapping
    goes, which is when no tensor and no handle uses it. So converting reads through a fresh mapping every
    CAST_WINDOW_BYTES and keeps no view of it (a tensor already in its model form is copied out): an fp16
    file loaded into bf16 peaks at the bf16 weights plus one window, not plus the whole fp16 file, and an
    fp32 file into fp32 not plus the convolution kernels (which as_loaded makes channels-last)."""
    out, f, window = {}, None, 0
    for key in keys:
        if f is None or window >= CAST_WINDOW_BYTES:
            f, window = safe_open(path, framework="pt"), 0  # the old mapping goes with its last user
        stored = f.get_tensor(key)
        if dtype is None:
            out[key] = stored
            continue
        t = as_loaded(stored, dtype)
        out[key] = stored.clone() if t is stored else t
        window += stored.nbytes
    return out


def read_state_dict(path, prefix="", dtype=None):
    """Tensors of `path` whose key starts with `prefix`, prefix removed. With `dtype`, as a model will hold
    them (as_loaded: floating ones in dtype, conv kernels channels-last), converted one tensor at a time, so a
    file is never held in two forms at once. .safetensors is read lazily (tensors kept as stored are views
    of the memory-mapped file)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                keys = [k for k in f.keys() if k.startswith(prefix)]
            return {k[len(prefix):]: v for k, v in _read_safetensors(path, keys, dtype).items()}
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise CheckpointError(f"{path}: not a readable .safetensors file "
                                  f"({str(e).splitlines()[0]})") from None
    try:
        # torch.save's zip format is memory-mapped (no copy until a tensor is used); legacy pickles load whole
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint that loads with weights_only=True "
                              f"({type(e).__name__}: {_gist(e)})") from None
    # Lightning .ckpt nests weights under "state_dict"; Diff-Plugin's tpb.pt / PromptTunner.pt under "model".
    for nest in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {k[len(prefix):]: v for k, v in obj.items() if isinstance(v, torch.Tensor) and k.startswith(prefix)}
    return out if dtype is None else {k: as_loaded(v, dtype) for k, v in out.items()}


def load_strict(model, state_dict, what, dtype=None, device="cpu", ignore=()):
    """Fill every parameter/buffer of `model` (usually built on the meta device) from `state_dict`.

    Every model tensor must be present with the same shape, and every checkpoint tensor used, except keys
    starting with one of `ignore`. Raises CheckpointError naming the first offenders. Returns the model in
    eval mode.
    """
    expected = model.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignore))}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{what}: {len(missing)} missing keys {missing[:4]}, "
                              f"{len(unexpected)} unexpected keys {unexpected[:4]}")
    wrong = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(given[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} shape mismatches (file vs model), first: {wrong[:3]}")
    # as_loaded: floating tensors in dtype, conv kernels channels-last (no copy for what read_state_dict
    # already converted)
    cast = {k: as_loaded(v, dtype, device) for k, v in given.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------- VAE (AutoencoderKL)
# Diffusers names -> the original CompVis names of minidiff.models.vae (as in `first_stage_model.*`).
# (diffusers pattern, original replacement), applied in order to every key. decoder.up_blocks.{i} is handled
# apart: diffusers counts up blocks from the lowest resolution, CompVis stores them at the level's index.
VAE_DIFFUSERS_RENAMES = [
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.up_blocks\.(\d+)\.resnets\.", r".up_blocks.\1.block."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", r".up_blocks.\1.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
    # mid-block attention: current names (to_q ...) and the legacy ones of older files (query ..., SD 1.4)
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.(to_q|query)\.", ".attn_1.q."),
    (r"\.attn_1\.(to_k|key)\.", ".attn_1.k."),
    (r"\.attn_1\.(to_v|value)\.", ".attn_1.v."),
    (r"\.attn_1\.(to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
]
# Training-only tensors of standalone VAE files (CompVis kl-f8: the GAN loss; EMA bookkeeping): not the model.
VAE_IGNORED = ("loss.", "model_ema.")


def vae_from_diffusers(state_dict):
    """Diffusers AutoencoderKL state dict -> original CompVis names (minidiff.models.vae). Tensors are not copied.

    Attention projections are nn.Linear [C, C] in diffusers and 1x1 convs [C, C, 1, 1] in the original.
    """
    ups = {int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    out = {}
    for key, tensor in state_dict.items():
        new = key
        for pattern, repl in VAE_DIFFUSERS_RENAMES:
            new = re.sub(pattern, repl, new)
        # up_blocks.i (i-th applied) -> up.(n-1-i) (stored at its resolution level)
        new = re.sub(r"\.up_blocks\.(\d+)\.", lambda m: f".up.{len(ups) - 1 - int(m[1])}.", new)
        if ".attn_1." in new and new.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1] (a view)
        out[new] = tensor
    return out


# ----------------------------------------------------------------------------------------------------- CLIP
# OpenAI `visual.*` names (ViT-B-32.pt's) -> the Hugging Face names of clip.py. The text encoder has HF
# `text_model.*` names in every file minidiff loads (the SD single file too): it needs no table.
# OpenAI visual.* (prefix removed) -> HF names, outside the blocks
CLIP_OPENAI_VISION_RENAMES = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
    "proj": "visual_projection.weight",
}
# inside block N: transformer.resblocks.N.<OpenAI>.{weight,bias} -> vision_model.encoder.layers.N.<HF>.*
CLIP_OPENAI_BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                             "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
# nn.MultiheadAttention's fused projection attn.in_proj_{weight,bias}: [3*width, ...] = q, k, v stacked
CLIP_OPENAI_FUSED_QKV = {"attn.in_proj_weight": "self_attn.{}_proj.weight",
                         "attn.in_proj_bias": "self_attn.{}_proj.bias"}
CLIP_OPENAI_TRANSPOSED = {"proj"}  # OpenAI: x @ proj, proj [width, proj]; nn.Linear: weight [proj, width]
# Present in some HF files (a buffer in transformers), recomputed in forward by minidiff: ignored.
CLIP_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def clip_vision_from_openai(state_dict):
    """OpenAI `visual.*` state dict (prefix removed) -> HF names. Unknown keys pass through (load_strict
    names them). Tensors are views, not copies, except the transposed projection."""
    out = {}
    for key, tensor in state_dict.items():
        block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if key in CLIP_OPENAI_VISION_RENAMES:
            new = CLIP_OPENAI_VISION_RENAMES[key]
            out[new] = tensor.t().contiguous() if key in CLIP_OPENAI_TRANSPOSED else tensor  # [C,P] -> [P,C]
        elif block and block[2] in CLIP_OPENAI_FUSED_QKV:
            layer = f"vision_model.encoder.layers.{block[1]}."
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):  # [3*C, ...] -> 3 x [C, ...]
                out[layer + CLIP_OPENAI_FUSED_QKV[block[2]].format(name)] = part
        elif block and block[2].rsplit(".", 1)[0] in CLIP_OPENAI_BLOCK_RENAMES:
            module, kind = block[2].rsplit(".", 1)  # e.g. "mlp.c_fc", "weight"
            layer = f"vision_model.encoder.layers.{block[1]}."
            out[f"{layer}{CLIP_OPENAI_BLOCK_RENAMES[module]}.{kind}"] = tensor
        else:
            out[key] = tensor
    return out


# -------------------------------------------------------------------------------- Stable Diffusion 1.x UNet
# Top-level diffusers UNet2DConditionModel modules -> CompVis UNetModel modules.
UNET_DIFFUSERS_TOP = {"time_embedding.linear_1.": "time_embed.0.",
                      "time_embedding.linear_2.": "time_embed.2.",
                      "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
# Block prefixes. Fields: b = diffusers block, j = layer in it, L = resnets per down block (up blocks: L + 1):
# down = 1 + b(L+1) + j, op = (b+1)(L+1), up = b(L+1) + j, up_last = b(L+1) + L, slot = 2 if the up block has
# attentions (Upsample after ResBlock + SpatialTransformer) else 1. The flag marks ResBlock prefixes.
UNET_DIFFUSERS_BLOCKS = [
    (r"down_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.", "input_blocks.{down}.0.", True),
    (r"down_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)\.", "input_blocks.{down}.1.", False),
    (r"down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv\.", "input_blocks.{op}.0.op.", False),
    (r"mid_block\.resnets\.(?P<j>\d+)\.", "middle_block.{mid}.", True),
    (r"mid_block\.attentions\.0\.", "middle_block.1.", False),
    (r"up_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.", "output_blocks.{up}.0.", True),
    (r"up_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)\.", "output_blocks.{up}.1.", False),
    (r"up_blocks\.(?P<b>\d+)\.upsamplers\.0\.", "output_blocks.{up_last}.{slot}.", False),
]
# Inside a ResBlock (diffusers ResnetBlock2D -> CompVis ResBlock). SpatialTransformer names are the same.
UNET_RESNET_RENAMES = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                       "norm2.": "out_layers.0.", "conv2.": "out_layers.3.",
                       "conv_shortcut.": "skip_connection."}


def _swap_prefix(key, pairs):
    """`key` with the first matching (old, new) prefix replaced by new; unchanged when none matches."""
    return next((new + key[len(old):] for old, new in pairs if key.startswith(old)), key)


def unet_from_diffusers(state_dict):
    """Diffusers UNet2DConditionModel-style names -> CompVis names, for any block configuration (also the
    diffusers-named Diff-Plugin SCB, whose down_blocks.0 / time_embedding map like a UNet's). Keys that no
    rule matches (e.g. the SCB's controlnet_*) pass unchanged. Tensors are not copied."""
    L = 1 + max([int(m[1]) for k in state_dict if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k))],
                default=-1)
    attn_up = {int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, tensor in state_dict.items():
        new = _swap_prefix(key, UNET_DIFFUSERS_TOP.items())
        for pattern, template, is_resnet in UNET_DIFFUSERS_BLOCKS:
            if m := re.match(pattern, key):
                b, j = int(m.groupdict().get("b", 0)), int(m.groupdict().get("j", 0))
                rest = key[m.end():]
                if is_resnet:
                    rest = _swap_prefix(rest, UNET_RESNET_RENAMES.items())
                new = template.format(down=1 + b * (L + 1) + j, op=(b + 1) * (L + 1), mid=2 * j,
                                      up=b * (L + 1) + j, up_last=b * (L + 1) + L,
                                      slot=2 if b in attn_up else 1)
                new += rest
                break
        out[new] = tensor
    return out


# ------------------------------------------------------------------------------------------ Diff-Plugin SCB
# The official scb/diffusion_pytorch_model.bin has diffusers ControlNet names, minidiff's SCB the CompVis
# UNet names of the same blocks. (diffusers prefix, minidiff prefix) pairs, read both ways.
SCB_DIFFUSERS_NAMES = [
    ("controlnet_cond_embedding.", "input_blocks.0.0."),  # conv on the condition latent (conv_in slot)
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("down_blocks.0.resnets.0.", "input_blocks.1.0."),
    ("down_blocks.0.attentions.0.", "input_blocks.1.1."),  # inside: same names (norm, proj_in, ...)
    ("down_blocks.0.resnets.1.", "input_blocks.2.0."),
    ("down_blocks.0.attentions.1.", "input_blocks.2.1."),
    ("controlnet_down_blocks.", "zero_convs."),  # the three zero-initialised 1x1 convs
]


def _rename_scb(state_dict, pairs, resnet_pairs):
    """Rename by the first matching (src, dst) block prefix; inside a ResBlock also by `resnet_pairs`."""
    out = {}
    for key, tensor in state_dict.items():
        for src, dst in pairs:
            if key.startswith(src):
                rest = key[len(src):]
                if ".resnets." in src + dst:  # inside a ResBlock: the UNet's table (norm1 -> in_layers.0 ...)
                    rest = _swap_prefix(rest, resnet_pairs)
                key = dst + rest
                break
        out[key] = tensor  # unknown keys pass through; load_strict names them
    return out


def scb_from_diffusers(state_dict):
    """Official (diffusers-named) SCB state dict -> minidiff.plugin.plugin.SCB names. Tensors are not copied."""
    return _rename_scb(state_dict, SCB_DIFFUSERS_NAMES, UNET_RESNET_RENAMES.items())


def scb_to_diffusers(state_dict):
    """minidiff.plugin.plugin.SCB state dict -> the official diffusers names (for tools/convert.py)."""
    return _rename_scb(state_dict, [(m, d) for d, m in SCB_DIFFUSERS_NAMES],
                       [(m, d) for d, m in UNET_RESNET_RENAMES.items()])
