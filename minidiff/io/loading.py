"""Building minidiff's networks from checkpoints: config from tensor shapes, family checks, strict load.

Each builder takes a state dict in minidiff's names (or a layout that weights.py renames), reads the config
from the tensor shapes (so tiny test checkpoints load too), checks the model family with a one-line
CheckpointError (SD 2.x, SDXL, inpainting ... are refused by name), builds the module on the meta device and
fills it with weights.load_strict (no second copy of the weights). Entry points: load_stable_diffusion
(the original SD 1.x single file or a diffusers folder) and load_clip_vision (Hugging Face or OpenAI CLIP).
"""
import json
import math
import os
import re
import zipfile
from dataclasses import replace

import torch
from safetensors import safe_open

from minidiff.models.clip import CLIP_TEXT_L14, CLIP_VISION_L14, CLIPTextModel, CLIPVisionModel
from minidiff.models.stable_diffusion import StableDiffusion
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.models.unet import UNet, UNetConfig
from minidiff.models.vae import AutoencoderKL, VAEConfig
from minidiff.io.weights import (CLIP_IGNORED, VAE_IGNORED, CheckpointError, clip_vision_from_openai,
                              load_strict, read_state_dict, unet_from_diffusers, vae_from_diffusers)


# -------------------------------------------------------------------------------------- VAE (AutoencoderKL)
# From `first_stage_model.*` of the SD single file, a diffusers `vae/` folder or a standalone VAE file.

def vae_config_from_state_dict(state_dict):
    """VAEConfig read from the tensor shapes of an original-layout VAE state dict."""
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
    if any(".down_blocks." in k or ".mid_block." in k for k in state_dict):
        state_dict = vae_from_diffusers(state_dict)
    cfg = vae_config_from_state_dict(state_dict)
    with torch.device("meta"):
        model = AutoencoderKL(cfg)  # no memory: load_strict assigns the checkpoint tensors
    return load_strict(model, state_dict, "VAE", dtype=dtype, device=device, ignore=VAE_IGNORED)


# ----------------------------------------------------------------------------------------------------- CLIP
# The text encoder (HF `text_model.*` names, also inside the SD single file) and the vision encoder from
# a Hugging Face folder/file or an OpenAI `visual.*` state dict (ViT-B-32.pt's).

# transformers' CLIPVisionConfig defaults, for keys a saved config.json leaves out (it keeps non-defaults).
_HF_VISION_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _clip_layers(state_dict, prefix):
    """Number of transformer blocks in a state dict with HF CLIP names."""
    pattern = re.escape(prefix) + r"encoder\.layers\.(\d+)\."
    found = {int(m[1]) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def build_clip_text(state_dict, dtype=None, device="cpu"):
    """CLIPTextModel from HF `text_model.*` tensors (the SD single file's cond_stage_model.transformer.*
    minus that prefix, or a diffusers text_encoder/). Config from shapes; heads = width // 64 (OpenAI's)."""
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


def _clip_vision_config(state_dict, hf, what):
    """CLIPVisionConfig from HF-named tensor shapes; heads/act/eps from config.json `hf` if there is one."""
    try:
        width = state_dict["vision_model.embeddings.class_embedding"].shape[0]
        patch = state_dict["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = state_dict["vision_model.embeddings.position_embedding.weight"].shape[0]
        mlp = state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{what}: no tensor {e}; not a CLIP vision model "
                              f"({len(state_dict)} tensors, first {list(state_dict)[:3]})") from None
    grid = math.isqrt(positions - 1)  # positions = grid * grid patches + 1 class token
    hf = {**_HF_VISION_DEFAULTS, **hf} if hf is not None else {"num_attention_heads": max(1, width // 64)}
    if hf.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{what}: activation {hf['hidden_act']!r}; minidiff has quick_gelu and gelu")
    proj = state_dict.get("visual_projection.weight")
    return replace(CLIP_VISION_L14, image_size=grid * patch, patch_size=patch, width=width, mlp=mlp,
                   layers=_clip_layers(state_dict, "vision_model."), heads=hf["num_attention_heads"],
                   act=hf.get("hidden_act", "quick_gelu"), eps=hf.get("layer_norm_eps", 1e-5),
                   projection=None if proj is None else proj.shape[0])


def _is_torchscript(path):
    """True for a TorchScript archive (as OpenAI's released ViT-*.pt files), code rather than a dict."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read_prefixed(path, prefixes, dtype):
    """Tensors of `path` under any of `prefixes`, full names kept (lazily: other towers stay on disk)."""
    return {p + k: v for p in prefixes for k, v in read_state_dict(path, p, dtype).items()}


def load_clip_vision(path, dtype=torch.float32, device="cpu"):
    """CLIPVisionModel from a Hugging Face folder (config.json optional; model.safetensors or
    pytorch_model.bin) or file (CLIPModel: its text tower is ignored; CLIPVisionModel[WithProjection]), or an
    OpenAI state dict (`visual.*`, e.g. ViT-B-32.pt's; text tower and logit_scale ignored). L/14 or B/32 (or
    any ViT CLIP) from the shapes. Strict; built on the meta device and filled with the file's tensors."""
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
    state_dict = _read_prefixed(path, ["vision_model.", "visual_projection."], dtype)
    if not state_dict:
        state_dict = clip_vision_from_openai(read_state_dict(path, "visual.", dtype))
    if not state_dict:
        raise CheckpointError(f"{path}: no vision_model.* (Hugging Face) or visual.* (OpenAI) tensors: "
                              "not a CLIP vision checkpoint")
    cfg = _clip_vision_config(state_dict, hf, what)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    return load_strict(model, state_dict, what, dtype=dtype, device=device, ignore=CLIP_IGNORED)


# ------------------------------------------------------------------------------------- Stable Diffusion 1.x
# Family checks with one-line errors, the UNet config read from tensor shapes, and load_stable_diffusion
# for the original single file or a diffusers folder.

def _check_sd1_unet(state_dict, what):
    """One-line CheckpointError when a CompVis-named UNet state dict is not an SD 1.x text-to-image UNet."""
    if any(k.startswith(("label_emb.", "add_embedding.")) for k in state_dict):
        raise CheckpointError(f"{what}: UNet has label_emb/add_embedding (size and pooled-text "
                              "conditioning): this looks like SDXL; minidiff loads SD 1.x")
    if "input_blocks.0.0.weight" not in state_dict:
        raise CheckpointError(f"{what}: no input_blocks.0.0 / conv_in tensor: not a Stable Diffusion UNet "
                              f"({len(state_dict)} tensors, first {list(state_dict)[:3]})")
    in_ch = state_dict["input_blocks.0.0.weight"].shape[1]
    if in_ch != 4:
        kind = {9: "an SD inpainting UNet", 8: "an InstructPix2Pix UNet"}.get(in_ch, "not an SD 1.x UNet")
        raise CheckpointError(f"{what}: in_channels {in_ch}: this looks like {kind}; minidiff loads the "
                              "4-channel text-to-image SD 1.x UNet")
    ctx = next((v.shape[1] for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx in (1024, 2048, 1280):
        family = "SD 2.x" if ctx == 1024 else "SDXL"
        raise CheckpointError(f"{what}: context width {ctx}: this looks like {family}; minidiff loads SD 1.x")
    if any(k.endswith("proj_in.weight") and v.ndim == 2 for k, v in state_dict.items()):
        raise CheckpointError(f"{what}: linear proj_in (use_linear_projection): this looks like SD 2.x; "
                              "minidiff loads SD 1.x")
    if any(".transformer_blocks.1." in k for k in state_dict):
        raise CheckpointError(f"{what}: several transformer blocks per SpatialTransformer: "
                              "this looks like SDXL; minidiff loads SD 1.x")


def unet_config_from_state_dict(state_dict):
    """UNetConfig read from the shapes of a CompVis-named UNet state dict (so tiny test checkpoints load).
    Heads (8) and GroupNorm groups (32) are not visible in shapes and keep the SD 1.x values."""
    mc, in_ch = state_dict["input_blocks.0.0.weight"].shape[:2]
    n_in = 1 + max(int(m[1]) for k in state_dict if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    ops = sorted(int(m[1]) for k in state_dict if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    L = ops[0] - 1 if ops else n_in - 1  # first Downsample follows the L ResBlocks of level 0
    levels = len(ops) + 1
    first = [1 + lv * (L + 1) for lv in range(levels)]  # first ResBlock of each level
    mult = tuple(state_dict[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first)
    attn = tuple(lv for lv, i in enumerate(first) if f"input_blocks.{i}.1.norm.weight" in state_dict)
    ctx = state_dict["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    return UNetConfig(in_channels=in_ch, out_channels=state_dict["out.2.weight"].shape[0], model_channels=mc,
                      channel_mult=mult, num_res_blocks=L, attention_levels=attn, context_dim=ctx)


def build_unet(state_dict, dtype=None, device="cpu", what="UNet"):
    """UNet from a CompVis-named (`model.diffusion_model.*` minus the prefix) or diffusers-named state dict;
    family checked, config from shapes, built on the meta device and filled strictly (no weight copy)."""
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


SD_SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                           "text": "cond_stage_model.transformer."}
SD_DIFFUSERS_FILES = {
    "unet": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    "vae": ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
    "text": ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
}


def _file_keys(path):
    """All tensor names of a checkpoint file (for error messages; safetensors reads only its header)."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(read_state_dict(path))


def _sd_part(path, part, dtype):
    """State dict of one part (unet / vae / text) of a single file or a diffusers folder, read lazily;
    floating tensors in `dtype` (cast tensor by tensor as they are read: no second copy of the part)."""
    if os.path.isdir(path):
        names = SD_DIFFUSERS_FILES[part]
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise CheckpointError(f"{path}: diffusers folder has no {names[0]} (or .bin): a part is missing")
        return read_state_dict(found[0], dtype=dtype)
    state_dict = read_state_dict(path, SD_SINGLE_FILE_PREFIXES[part], dtype)
    if part == "unet" and not state_dict:
        keys = _file_keys(path)
        if any(k.startswith("conditioner.") for k in keys):
            raise CheckpointError(f"{path}: conditioner.* text encoders: this looks like SDXL; "
                                  "minidiff loads SD 1.x")
        raise CheckpointError(f"{path}: no model.diffusion_model.* tensors: not a Stable Diffusion single "
                              f"file ({len(keys)} tensors, first {keys[:3]})")
    if part == "text":
        # some early files store the CLIPTextModel without its text_model. level
        state_dict = {(k if k.startswith("text_model.") else "text_model." + k): v
                      for k, v in state_dict.items()}
    return state_dict


def stored_latent_scale(path):
    """The VAE's latent scale as the checkpoint states it: the "latent_scale" metadata of a single
    .safetensors file (minidiff's small family writes it), a diffusers folder's vae/config.json
    "scaling_factor", else SD 1.x's 0.18215 (the original single files do not state it)."""
    default = VAEConfig().latent_scale
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "vae", "config.json")) as f:
                return float(json.load(f).get("scaling_factor", default))
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                return float((f.metadata() or {}).get("latent_scale", default))
    except (OSError, ValueError, TypeError):
        pass  # no or unreadable config: the SD value (the weights themselves were read strictly)
    return default


def load_stable_diffusion(path, dtype=torch.float32, device="cpu", text_encoder=True):
    """Tokenizer, CLIP text encoder, UNet and VAE of an SD 1.x checkpoint: the original single file
    (.safetensors, read lazily; .ckpt through torch.load(weights_only=True)) or a diffusers folder
    (unet/, vae/, text_encoder/). Strict, config from shapes, no second copy of the weights.
    text_encoder=False leaves the text encoder unread (None): Diff-Plugin restoration and plugin training
    replace the text by TPB tokens, so only the selector and text-to-image need it (0.49 GB in fp32)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    unet = build_unet(_sd_part(path, "unet", dtype), dtype, device, what=f"UNet ({path})")
    vae = build_vae(_sd_part(path, "vae", dtype), dtype, device)
    vae.cfg = replace(vae.cfg, latent_scale=stored_latent_scale(path))
    text = build_clip_text(_sd_part(path, "text", dtype), dtype, device) if text_encoder else None
    return StableDiffusion(CLIPTokenizer(), text, unet, vae)
