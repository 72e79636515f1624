"""Reading checkpoints and loading them strictly into minidiff modules.

Generic core (this section): read a state dict from .safetensors (lazily, only the keys asked for) or from a
pickled .ckpt/.bin/.pt (torch.load with weights_only=True, memory-mapped), and load it into a module built on the
meta device, so the weights exist once in memory. The per-family rename tables and loaders follow below.
"""
import os
import zipfile

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not the model it should be (one-line message)."""


def read_state_dict(path, prefix=""):
    """Tensors of `path` whose key starts with `prefix`, prefix removed. .safetensors is read lazily."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise CheckpointError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None
    try:
        # torch.save's zip format is memory-mapped (no copy until a tensor is used); legacy pickles are read whole
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint that loads with weights_only=True "
                              f"({type(e).__name__}: {str(e).strip()[:160]})") from None
    # Lightning .ckpt nests the weights under "state_dict"; Diff-Plugin's tpb.pt / PromptTunner.pt under "model".
    for nest in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k[len(prefix):]: v for k, v in obj.items() if isinstance(v, torch.Tensor) and k.startswith(prefix)}


def load_strict(model, state_dict, what, dtype=None, device="cpu", ignore=()):
    """Fill every parameter/buffer of `model` (usually built on the meta device) from `state_dict`.

    Every model tensor must be present with the same shape, and every checkpoint tensor used, except keys
    starting with one of `ignore`. Raises CheckpointError naming the first offenders. Returns the model in eval mode.
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
    # Floating tensors take the requested dtype; integer buffers keep theirs.
    cast = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
            for k, v in given.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------------------------------------
# VAE (AutoencoderKL): diffusers names -> original CompVis names, and the builder used for
# `first_stage_model.*` and for a diffusers `vae/` folder (minidiff.vae uses the original single-file names).
# -----------------------------------------------------------------------------------------------------------
import re  # noqa: E402

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
    """Diffusers AutoencoderKL state dict -> original CompVis names (minidiff.vae). Tensors are not copied.

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


def vae_config_from_state_dict(state_dict):
    """VAEConfig read from the tensor shapes of an original-layout VAE state dict."""
    from minidiff.vae import VAEConfig
    try:
        ch, in_channels = state_dict["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(m[1]) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m[1]) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ch_mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        out_channels = state_dict["decoder.conv_out.weight"].shape[0]
        z_channels = state_dict["post_quant_conv.weight"].shape[0]
        return VAEConfig(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                         num_res_blocks=len(blocks), z_channels=z_channels)
    except KeyError as e:
        keys = list(state_dict)[:3]
        raise CheckpointError(f"VAE: no tensor {e} in the state dict; this is not an SD AutoencoderKL "
                              f"({len(state_dict)} tensors, first {keys})") from None


def build_vae(state_dict, dtype=None, device="cpu"):
    """AutoencoderKL from an original-layout (`first_stage_model.*` minus the prefix) or diffusers-layout
    state dict; the config is read from the shapes (so tiny test checkpoints load too). Strict, no copy."""
    from minidiff.vae import AutoencoderKL
    if any(".down_blocks." in k or ".mid_block." in k for k in state_dict):
        state_dict = vae_from_diffusers(state_dict)
    cfg = vae_config_from_state_dict(state_dict)
    with torch.device("meta"):
        model = AutoencoderKL(cfg)  # no memory: load_strict assigns the checkpoint tensors
    return load_strict(model, state_dict, "VAE", dtype=dtype, device=device, ignore=VAE_IGNORED)


# -----------------------------------------------------------------------------------------------------------
# CLIP: the text encoder (HF `text_model.*` names, also inside the SD single file) and the vision encoder
# from a Hugging Face folder/file or an OpenAI `visual.*` state dict (ViT-B-32.pt's). clip.py has HF names.
# -----------------------------------------------------------------------------------------------------------
import json  # noqa: E402
import math  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import replace  # noqa: E402

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
# transformers' CLIPVisionConfig defaults, for keys a saved config.json leaves out (it keeps non-defaults).
_HF_VISION_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


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


def _clip_layers(state_dict, prefix):
    """Number of transformer blocks in a state dict with HF CLIP names."""
    pattern = re.escape(prefix) + r"encoder\.layers\.(\d+)\."
    found = {int(m[1]) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def build_clip_text(state_dict, dtype=None, device="cpu"):
    """CLIPTextModel from HF `text_model.*` tensors (the SD single file's cond_stage_model.transformer.*
    minus that prefix, or a diffusers text_encoder/). Config from shapes; heads = width // 64 (OpenAI's)."""
    from minidiff.clip import CLIP_TEXT_L14, CLIPTextModel
    try:
        vocab, width = state_dict["text_model.embeddings.token_embedding.weight"].shape
        positions = state_dict["text_model.embeddings.position_embedding.weight"].shape[0]
        mlp = state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"CLIP text encoder: no tensor {e}; not a CLIP text model with Hugging Face "
                              f"names ({len(state_dict)} tensors, first {list(state_dict)[:3]})") from None
    if width == 1024:
        raise CheckpointError("CLIP text encoder: width 1024: this looks like SD 2.x / OpenCLIP ViT-H; "
                              "minidiff loads SD 1.x (CLIP ViT-L/14 text, width 768)")
    cfg = replace(CLIP_TEXT_L14, vocab_size=vocab, max_positions=positions, width=width,
                  heads=max(1, width // 64), mlp=mlp, layers=_clip_layers(state_dict, "text_model."))
    with torch.device("meta"):
        model = CLIPTextModel(cfg)  # no memory: load_strict assigns the checkpoint tensors
    return load_strict(model, state_dict, "CLIP text encoder", dtype=dtype, device=device,
                       ignore=CLIP_IGNORED)


def _clip_vision_config(sd, hf, what):
    """CLIPVisionConfig from HF-named tensor shapes; heads/act/eps from config.json `hf` if there is one."""
    from minidiff.clip import CLIP_VISION_L14
    try:
        width = sd["vision_model.embeddings.class_embedding"].shape[0]
        patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        mlp = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{what}: no tensor {e}; not a CLIP vision model "
                              f"({len(sd)} tensors, first {list(sd)[:3]})") from None
    grid = math.isqrt(positions - 1)  # positions = grid * grid patches + 1 class token
    hf = {**_HF_VISION_DEFAULTS, **hf} if hf is not None else {"num_attention_heads": max(1, width // 64)}
    if hf.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{what}: activation {hf['hidden_act']!r}; minidiff has quick_gelu and gelu")
    proj = sd.get("visual_projection.weight")
    return replace(CLIP_VISION_L14, image_size=grid * patch, patch_size=patch, width=width, mlp=mlp,
                   layers=_clip_layers(sd, "vision_model."), heads=hf["num_attention_heads"],
                   act=hf.get("hidden_act", "quick_gelu"), eps=hf.get("layer_norm_eps", 1e-5),
                   projection=None if proj is None else proj.shape[0])


def _is_torchscript(path):
    """True for a TorchScript archive (as OpenAI's released ViT-*.pt files), code rather than a dict."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read_prefixed(path, prefixes):
    """Tensors of `path` under any of `prefixes`, full names kept (lazily: other towers stay on disk)."""
    return {p + k: v for p in prefixes for k, v in read_state_dict(path, p).items()}


def load_clip_vision(path, dtype=torch.float32, device="cpu"):
    """CLIPVisionModel from a Hugging Face folder (config.json optional; model.safetensors or
    pytorch_model.bin) or file (CLIPModel: its text tower is ignored; CLIPVisionModel[WithProjection]), or an
    OpenAI state dict (`visual.*`, e.g. ViT-B-32.pt's; text tower and logit_scale ignored). L/14 or B/32 (or
    any ViT CLIP) from the shapes. Strict; built on the meta device and filled with the file's tensors."""
    from minidiff.clip import CLIPVisionModel
    hf = None
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            try:
                with open(os.path.join(path, "config.json")) as f:
                    hf = json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}/config.json: unreadable ({str(e).splitlines()[0]})") from None
            hf = hf.get("vision_config", hf)  # CLIPModel nests it; CLIPVisionModel's config is flat
        names = [n for n in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise CheckpointError(f"{path}: folder has neither model.safetensors nor pytorch_model.bin")
        path = os.path.join(path, names[0])
    what = f"CLIP vision ({path})"
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: a TorchScript archive (as OpenAI's released ViT-B-32.pt); minidiff "
                              "reads state dicts only. Convert once, where you trust the file: torch.save("
                              "torch.jit.load(PATH, map_location='cpu').state_dict(), 'ViT-B-32.state.pt')")
    sd = _read_prefixed(path, ["vision_model.", "visual_projection."])
    if not sd:
        sd = clip_vision_from_openai(read_state_dict(path, "visual."))
    if not sd:
        raise CheckpointError(f"{path}: no vision_model.* (Hugging Face) or visual.* (OpenAI) tensors: "
                              "not a CLIP vision checkpoint")
    cfg = _clip_vision_config(sd, hf, what)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    return load_strict(model, sd, what, dtype=dtype, device=device, ignore=CLIP_IGNORED)


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 1.x: the UNet rename table (diffusers -> CompVis names), the UNet config read from tensor shapes,
# family checks with one-line errors, and load_stable_diffusion for the original single file or a diffusers folder.
# ---------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass  # noqa: E402

# Top-level diffusers UNet2DConditionModel modules -> CompVis UNetModel modules.
UNET_DIFFUSERS_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                      "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
# Block prefixes. Fields: b = diffusers block, j = layer in it, L = resnets per down block (up blocks have L + 1):
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
# Inside a ResBlock (diffusers ResnetBlock2D -> CompVis ResBlock). SpatialTransformer names are the same in both.
UNET_RESNET_RENAMES = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                       "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}


def unet_from_diffusers(state_dict):
    """Diffusers UNet2DConditionModel-style names -> CompVis names, for any block configuration (also the
    diffusers-named Diff-Plugin SCB, whose down_blocks.0 / time_embedding map like a UNet's). Keys that no rule
    matches (e.g. the SCB's controlnet_*) pass unchanged. Tensors are not copied."""
    L = 1 + max([int(m[1]) for k in state_dict if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k))],
                default=-1)
    attn_up = {int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, tensor in state_dict.items():
        new = next((v + key[len(p):] for p, v in UNET_DIFFUSERS_TOP.items() if key.startswith(p)), key)
        for pattern, template, is_resnet in UNET_DIFFUSERS_BLOCKS:
            if m := re.match(pattern, key):
                b, j = int(m.groupdict().get("b", 0)), int(m.groupdict().get("j", 0))
                rest = key[m.end():]
                if is_resnet:
                    rest = next((v + rest[len(p):] for p, v in UNET_RESNET_RENAMES.items() if rest.startswith(p)),
                                rest)
                new = template.format(down=1 + b * (L + 1) + j, op=(b + 1) * (L + 1), mid=2 * j,
                                      up=b * (L + 1) + j, up_last=b * (L + 1) + L, slot=2 if b in attn_up else 1)
                new += rest
                break
        out[new] = tensor
    return out


def _check_sd1_unet(sd, what):
    """One-line CheckpointError when a CompVis-named UNet state dict is not an SD 1.x text-to-image UNet."""
    if any(k.startswith(("label_emb.", "add_embedding.")) for k in sd):
        raise CheckpointError(f"{what}: UNet has label_emb/add_embedding (size and pooled-text conditioning): "
                              "this looks like SDXL; minidiff loads SD 1.x")
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{what}: no input_blocks.0.0 / conv_in tensor: not a Stable Diffusion UNet "
                              f"({len(sd)} tensors, first {list(sd)[:3]})")
    in_ch = sd["input_blocks.0.0.weight"].shape[1]
    if in_ch != 4:
        kind = {9: "an SD inpainting UNet", 8: "an InstructPix2Pix UNet"}.get(in_ch, "not an SD 1.x UNet")
        raise CheckpointError(f"{what}: in_channels {in_ch}: this looks like {kind}; minidiff loads the "
                              "4-channel text-to-image SD 1.x UNet")
    ctx = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx in (1024, 2048, 1280):
        family = "SD 2.x" if ctx == 1024 else "SDXL"
        raise CheckpointError(f"{what}: context width {ctx}: this looks like {family}; minidiff loads SD 1.x")
    if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in sd.items()):
        raise CheckpointError(f"{what}: linear proj_in (use_linear_projection): this looks like SD 2.x; "
                              "minidiff loads SD 1.x")
    if any(".transformer_blocks.1." in k for k in sd):
        raise CheckpointError(f"{what}: several transformer blocks per SpatialTransformer: this looks like SDXL; "
                              "minidiff loads SD 1.x")


def unet_config_from_state_dict(sd):
    """UNetConfig read from the shapes of a CompVis-named UNet state dict (so tiny test checkpoints load).
    Heads (8) and GroupNorm groups (32) are not visible in shapes and keep the SD 1.x values."""
    from minidiff.unet import UNetConfig
    mc, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
    n_in = 1 + max(int(m[1]) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    ops = sorted(int(m[1]) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    L = ops[0] - 1 if ops else n_in - 1  # first Downsample follows the L ResBlocks of level 0
    levels = len(ops) + 1
    first = [1 + lv * (L + 1) for lv in range(levels)]  # first ResBlock of each level
    mult = tuple(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first)
    attn = tuple(lv for lv, i in enumerate(first) if f"input_blocks.{i}.1.norm.weight" in sd)
    ctx = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    return UNetConfig(in_channels=in_ch, out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
                      channel_mult=mult, num_res_blocks=L, attention_levels=attn, context_dim=ctx)


def build_unet(state_dict, dtype=None, device="cpu", what="UNet"):
    """UNet from a CompVis-named (`model.diffusion_model.*` minus the prefix) or diffusers-named state dict;
    family checked, config from shapes, built on the meta device and filled strictly (no weight copy)."""
    from minidiff.unet import UNet
    if any(k.startswith(("conv_in.", "down_blocks.", "mid_block.")) for k in state_dict):
        state_dict = unet_from_diffusers(state_dict)
    _check_sd1_unet(state_dict, what)
    try:
        cfg = unet_config_from_state_dict(state_dict)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{what}: unusual UNet layout (no tensor {e}); minidiff loads SD 1.x") from None
    with torch.device("meta"):
        model = UNet(cfg)  # no memory: load_strict assigns the checkpoint tensors
    return load_strict(model, state_dict, what, dtype=dtype, device=device)


@dataclass
class StableDiffusion:
    """The four parts of an SD 1.x checkpoint: ids = tokenizer(texts); hidden, pooled = text_encoder(ids);
    eps = unet(latents, t, hidden); vae.encode / vae.decode."""
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module


SD_SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                           "text": "cond_stage_model.transformer."}
SD_DIFFUSERS_FILES = {"unet": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
                      "vae": ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
                      "text": ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin")}


def _file_keys(path):
    """All tensor names of a checkpoint file (for error messages; safetensors reads only its header)."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(read_state_dict(path))


def _sd_part(path, part):
    """State dict of one part (unet / vae / text) of a single file or a diffusers folder, read lazily."""
    if os.path.isdir(path):
        names = SD_DIFFUSERS_FILES[part]
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise CheckpointError(f"{path}: diffusers folder has no {names[0]} (or .bin): a part is missing")
        return read_state_dict(found[0])
    sd = read_state_dict(path, SD_SINGLE_FILE_PREFIXES[part])
    if part == "unet" and not sd:
        keys = _file_keys(path)
        if any(k.startswith("conditioner.") for k in keys):
            raise CheckpointError(f"{path}: conditioner.* text encoders: this looks like SDXL; "
                                  "minidiff loads SD 1.x")
        raise CheckpointError(f"{path}: no model.diffusion_model.* tensors: not a Stable Diffusion single file "
                              f"({len(keys)} tensors, first {keys[:3]})")
    if part == "text":
        # some early files store the CLIPTextModel without its text_model. level
        sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    return sd


def load_stable_diffusion(path, dtype=torch.float32, device="cpu"):
    """Tokenizer, CLIP text encoder, UNet and VAE of an SD 1.x checkpoint: the original single file
    (.safetensors, read lazily; .ckpt through torch.load(weights_only=True)) or a diffusers folder
    (unet/, vae/, text_encoder/). Strict, config from shapes, no second copy of the weights."""
    from minidiff.tokenizer import CLIPTokenizer
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    unet = build_unet(_sd_part(path, "unet"), dtype, device, what=f"UNet ({path})")
    vae = build_vae(_sd_part(path, "vae"), dtype, device)
    text_encoder = build_clip_text(_sd_part(path, "text"), dtype, device)
    return StableDiffusion(CLIPTokenizer(), text_encoder, unet, vae)


# ---------------------------------------------------------------------------------------------------------------
# Diff-Plugin SCB: the official scb/diffusion_pytorch_model.bin has diffusers ControlNet names, minidiff's SCB
# the CompVis UNet names of the same blocks. (diffusers prefix, minidiff prefix) pairs, read both ways.
# ---------------------------------------------------------------------------------------------------------------
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


def _rename_scb(state_dict, to_minidiff):
    out = {}
    for key, tensor in state_dict.items():
        new = key
        for diff, mini in SCB_DIFFUSERS_NAMES:
            src, dst = (diff, mini) if to_minidiff else (mini, diff)
            if key.startswith(src):
                rest = key[len(src):]
                if ".resnets." in diff:  # inside a ResBlock: the UNet's table (norm1 -> in_layers.0 ...)
                    for rdiff, rmini in UNET_RESNET_RENAMES.items():
                        rsrc, rdst = (rdiff, rmini) if to_minidiff else (rmini, rdiff)
                        if rest.startswith(rsrc):
                            rest = rdst + rest[len(rsrc):]
                            break
                new = dst + rest
                break
        out[new] = tensor  # unknown keys pass through; load_strict names them
    return out


def scb_from_diffusers(state_dict):
    """Official (diffusers-named) SCB state dict -> minidiff.plugin.SCB names. Tensors are not copied."""
    return _rename_scb(state_dict, to_minidiff=True)


def scb_to_diffusers(state_dict):
    """minidiff.plugin.SCB state dict -> the official diffusers names (for tools/convert.py)."""
    return _rename_scb(state_dict, to_minidiff=False)
