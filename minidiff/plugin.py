"""Diff-Plugin Task-Plugins: the Task-Prompt Branch (TPB), the Spatial Complement Branch (SCB) and the
official restoration loop that injects them into a frozen Stable Diffusion 1.x.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024),
sec. 3.3. Reference implementation mirrored: yuhaoliu7456/Diff-Plugin @ 79e12bb: modules/TPB.py (TPBNet),
modules/SCB.py (SCBNet, a ControlNet cut down to one down block), infer.py and demo.py (the sampling loop
and plugin chaining).

- TPB ("Task-Prompt Branch"): a token-wise MLP that turns the 256 patch tokens of CLIP ViT-L/14's last
  hidden state into 256 visual-prompt tokens of width 768. They replace the text context in every
  cross-attention of the UNet and of the SCB.
- SCB ("Spatial Complement Branch"): conv over the VAE latent of the input photo, two (ResBlock +
  cross-attention transformer) layers, three zero-initialised 1x1 convs; the three outputs are added to the
  UNet's skip connections 0, 1, 2, the ones its last decoder stage consumes. Parameter names follow the
  CompVis UNet (`input_blocks.{1,2}`, `time_embed`); the diffusers-named official file maps via weights.py.

    plugin = load_plugin("pre-trained/derain")                  # or "plugins/derain.safetensors"
    photo = load_image(...)                                      # the photo as loaded (EXIF-rotated RGB)
    out = restore(sd, clip_vision, [plugin], official_resize(photo), clip_image=photo)
"""
import json
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from minidiff.imageio import atomic_write
from minidiff.layers import timestep_embedding
from minidiff.weights import CheckpointError, load_strict, read_state_dict

# The eight official tasks, in the official demo's order (demo.py l.32): selection and chaining follow it.
TASKS = ("derain", "desnow", "lowlight", "dehaze", "deblur", "highlight", "face", "demoire")
# Tasks whose sampling starts from pure noise instead of the re-noised input latent (demo.py l.179-182).
PURE_NOISE_TASKS = ("lowlight", "highlight")
RENOISE_FROM = 960  # infer.py `time_threshold`: at every step with t >= this, x = add_noise(cond, noise, t)
MIN_SIDE = 512  # infer.py l.96-107: a photo with a side below this is upscaled so its short side is 512
FORMAT = "minidiff-plugin"  # safetensors metadata "format" of minidiff's one-file plugins


@dataclass(frozen=True)
class PluginConfig:
    """Task-Plugin sizes; defaults are the official ones (TPB.py, scb/config.json)."""
    clip_dim: int = 1024  # width of CLIP ViT-L/14's hidden states (TPB input)
    context_dim: int = 768  # width of the UNet's cross-attention context (TPB output, SD-1.x text width)
    latent_channels: int = 4  # VAE latent channels (SCB input)
    channels: int = 320  # SCB width = the UNet's first level (block_out_channels [320])
    heads: int = 8  # SCB heads (config.json attention_head_dim 8 = 8 heads of 40 ch in diffusers 0.17)


# A tiny plugin for tests: fits unet.TINY_UNET (32 wide, context 32) and clip.TINY_CLIP_VISION (128 wide).
TINY_PLUGIN = replace(PluginConfig(), clip_dim=128, context_dim=32, channels=32, heads=2)


class TPB(nn.Module):
    """Task-Prompt Branch: [Linear, LayerNorm, LeakyReLU] x 2, then Linear, applied to every token.

    Names as TPBNet's state dict (`visual_projection.{0,3,6}` Linear, `{1,4}` LayerNorm).
    """

    def __init__(self, cfg=PluginConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.clip_dim
        self.visual_projection = nn.Sequential(
            nn.Linear(d, d), nn.LayerNorm(d, eps=1e-5), nn.LeakyReLU(0.01),
            nn.Linear(d, d), nn.LayerNorm(d, eps=1e-5), nn.LeakyReLU(0.01),
            nn.Linear(d, cfg.context_dim))

    def forward(self, feats):
        """CLIP patch tokens [B, 256, clip_dim] (last hidden state, CLS dropped) -> [B, 256, context_dim]."""
        return self.visual_projection(feats)


class SCB(nn.Module):
    """Spatial Complement Branch: the first level of an SD UNet encoder, reading the VAE latent of the photo.

    Official SCBNet (a diffusers ControlNet with one CrossAttnDownBlock2D, no downsampler, no mid block)
    computes `sample = controlnet_cond_embedding(cond)` and so discards the noisy latent it is given: here
    the noisy latent is not an argument at all. Outputs: 3 residuals [B, channels, h, w] for UNet skips 0-2.
    """

    def __init__(self, cfg=PluginConfig()):
        super().__init__()
        from minidiff.unet import ResBlock, SpatialTransformer  # the SD core's blocks, CompVis names
        self.cfg = cfg
        c, emb = cfg.channels, 4 * cfg.channels
        # time embedding: sinusoid(channels) -> Linear -> SiLU -> Linear (diffusers TimestepEmbedding)
        self.time_embed = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        # input_blocks.0.0 sits where the UNet's conv_in is, but reads the condition latent (official
        # `controlnet_cond_embedding`); input_blocks.{1,2} = CrossAttnDownBlock2D's 2 x (resnet, attention)
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.latent_channels, c, 3, padding=1)])])
        for _ in range(2):
            layer = [ResBlock(c, c, emb), SpatialTransformer(c, cfg.heads, cfg.context_dim)]
            self.input_blocks.append(nn.ModuleList(layer))
        # official `controlnet_down_blocks.{0,1,2}`: 1x1 convs, zero at init (ControlNet's zero convs)
        self.zero_convs = nn.ModuleList([nn.Conv2d(c, c, 1) for _ in range(3)])
        for conv in self.zero_convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, cond, t, context):
        """cond [B, 4, h, w] (LATENT_SCALE x posterior mean of the photo), t (int, 0-d or [B]), context
        [B, N, context_dim] (TPB tokens) -> list of 3 residuals [B, channels, h, w]."""
        t = torch.as_tensor(t, device=cond.device).reshape(-1).expand(cond.shape[0])  # [B]
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels).to(cond.dtype))  # [B, 4 * channels]
        h = self.input_blocks[0][0](cond)  # [B, C, h, w]: the official model's `sample`
        outs = [self.zero_convs[0](h)]
        for i, (res, attn) in enumerate(self.input_blocks[1:], start=1):
            h = attn(res(h, emb), context)  # [B, C, h, w]: ResBlock with time, cross-attention on TPB tokens
            outs.append(self.zero_convs[i](h))
        return outs


class TaskPlugin(nn.Module):
    """One Task-Plugin: task name, TPB and SCB. `metadata` keeps what its file said (base model, steps)."""

    def __init__(self, task, tpb, scb, metadata=None):
        super().__init__()
        self.task, self.tpb, self.scb = task, tpb, scb
        self.metadata = dict(metadata or {})

    def extra_repr(self):
        return f"task={self.task!r}"


# --------------------------------------------------------------------------------------------------------
# Files: the official folder `<task>/{scb/config.json, scb/diffusion_pytorch_model.bin, tpb.pt}` and
# minidiff's `<task>.safetensors` (keys `tpb.*`, `scb.*`; metadata format, task, heads, base_model, ...).
# --------------------------------------------------------------------------------------------------------

def strip_module_prefix(state_dict):
    """Drop the `module.` prefix DataParallel/DDP training leaves on every key (official tpb.pt may)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def config_from_state_dicts(tpb_sd, scb_sd, heads):
    """PluginConfig from the TPB and SCB (minidiff names) tensor shapes; the head count is not in them."""
    try:
        clip_dim = tpb_sd["visual_projection.0.weight"].shape[1]
        context_dim = tpb_sd["visual_projection.6.weight"].shape[0]
        channels, latent_channels = scb_sd["input_blocks.0.0.weight"].shape[:2]
    except KeyError as e:
        raise CheckpointError(f"plugin: no tensor {e}; not a Diff-Plugin TPB/SCB state dict") from None
    return PluginConfig(clip_dim=clip_dim, context_dim=context_dim, latent_channels=latent_channels,
                        channels=channels, heads=heads)


def build_plugin(task, tpb_sd, scb_sd, heads, metadata=None, dtype=None, device="cpu"):
    """TaskPlugin from minidiff-named state dicts (strict, built on the meta device, no weight copy)."""
    cfg = config_from_state_dicts(tpb_sd, scb_sd, heads)
    with torch.device("meta"):
        tpb, scb = TPB(cfg), SCB(cfg)
    load_strict(tpb, tpb_sd, f"{task} TPB", dtype=dtype, device=device)
    load_strict(scb, scb_sd, f"{task} SCB", dtype=dtype, device=device)
    return TaskPlugin(task, tpb, scb, metadata).eval()


def read_scb_config(folder):
    """Official scb/config.json -> number of heads, after checking it describes the SCB implemented here."""
    path = os.path.join(folder, "scb", "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the SCB config ({e})") from None
    heads = cfg.get("attention_head_dim", 8)
    heads = heads[0] if isinstance(heads, list) else heads
    expect = {"down_block_types": ["CrossAttnDownBlock2D"], "layers_per_block": 2, "norm_num_groups": 32}
    for key, value in expect.items():
        if cfg.get(key, value) != value:
            raise CheckpointError(f"{path}: {key} = {cfg[key]!r}, but a Diff-Plugin SCB has {value!r}")
    return int(heads)


def load_plugin(path, task=None, dtype=torch.float32, device="cpu"):
    """Load a Task-Plugin: an official folder (`<task>/scb/`, `<task>/tpb.pt`) or a minidiff .safetensors.

    task defaults to the folder name / the file's metadata / the file stem.
    """
    from minidiff.weights import scb_from_diffusers
    path = os.fspath(path)
    if os.path.isdir(path):
        heads = read_scb_config(path)
        scb_dir = os.path.join(path, "scb")
        names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
        files = [os.path.join(scb_dir, n) for n in names if os.path.isfile(os.path.join(scb_dir, n))]
        if not files:
            raise CheckpointError(f"{scb_dir}: no diffusion_pytorch_model.bin or .safetensors")
        scb_sd = scb_from_diffusers(strip_module_prefix(read_state_dict(files[0])))
        tpb_sd = strip_module_prefix(read_state_dict(os.path.join(path, "tpb.pt")))
        task = task or os.path.basename(os.path.normpath(path))
        return build_plugin(task, tpb_sd, scb_sd, heads, {"source": "official"}, dtype, device)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: not a plugin folder (scb/ + tpb.pt) nor a .safetensors file")
    sd = read_state_dict(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: no '{FORMAT}' metadata; not a minidiff plugin file")
    tpb_sd = {k[4:]: v for k, v in sd.items() if k.startswith("tpb.")}
    scb_sd = {k[4:]: v for k, v in sd.items() if k.startswith("scb.")}
    task = task or meta.get("task") or os.path.basename(path)[:-len(".safetensors")]
    return build_plugin(task, tpb_sd, scb_sd, int(meta.get("heads", 8)), meta, dtype, device)


def save_plugin(plugin, path, metadata=None):
    """Write `plugin` as one minidiff .safetensors (atomically). metadata: e.g. base_model, steps_trained."""
    meta = {k: str(v) for k, v in {**plugin.metadata, **(metadata or {})}.items()}
    meta.update(format=FORMAT, task=plugin.task, heads=str(plugin.scb.cfg.heads))
    tensors = {k: v.detach().contiguous().cpu() for k, v in plugin.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _is_plugin_file(path):
    try:
        with safe_open(path, framework="pt") as f:  # reads the header only
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a readable safetensors file: not a plugin
        return False


def find_plugins(folder):
    """Plugins in `folder` -> {task: path}, official tasks first in TASKS order, then others by name.

    Recognises `<task>/scb/config.json` + `<task>/tpb.pt` (official) and `<task>.safetensors` with minidiff
    plugin metadata (preferred when both exist). Other files (a selector.safetensors, notes) are ignored.
    """
    found = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        full = os.path.join(folder, name)
        if os.path.isdir(full) and os.path.isfile(os.path.join(full, "scb", "config.json")) \
                and os.path.isfile(os.path.join(full, "tpb.pt")):
            found.setdefault(name, full)
        elif name.endswith(".safetensors") and os.path.isfile(full) and _is_plugin_file(full):
            found[name[:-len(".safetensors")]] = full
    order = [t for t in TASKS if t in found] + sorted(t for t in found if t not in TASKS)
    return {t: found[t] for t in order}


# --------------------------------------------------------------------------------------------------------
# The official restoration loop (infer.py l.86-160, demo.py l.160-251).
# --------------------------------------------------------------------------------------------------------

def official_resize(image):
    """The official resolution rule: short side raised to 512 when a side is below 512 (PIL bicubic, int()
    truncation, ties to the else branch, infer.py l.96-107), then the LANCZOS rescale to multiples of 8 of
    diffusers' VaeImageProcessor.preprocess. Photos with both sides >= 512 are not downscaled."""
    w, h = image.size
    if w < MIN_SIDE or h < MIN_SIDE:
        size = (MIN_SIDE, int(MIN_SIDE / w * h)) if w < h else (int(MIN_SIDE / h * w), MIN_SIDE)
        image = image.resize(size, Image.BICUBIC)
    return to_multiple_of_8(image)


def to_multiple_of_8(image):
    """Rescale (not crop) to (W - W % 8, H - H % 8) with LANCZOS, as VaeImageProcessor (a copy if there)."""
    w, h = image.size
    if w < 8 or h < 8:
        raise ValueError(f"image {w}x{h} is too small; apply official_resize() first")
    return image.resize((w - w % 8, h - h % 8), Image.LANCZOS)


def pil_to_tensor(image):
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1] (uint8 / 255, then 2x - 1, as VaeImageProcessor)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB")).astype(np.float32) / 255.0)  # [H, W, 3]
    return (2.0 * x - 1.0).permute(2, 0, 1)[None]  # [1, 3, H, W]


def tensor_to_pil(x):
    """[1, 3, H, W] about [-1, 1] -> PIL RGB: (x/2 + 0.5) clamped, x 255, rounded half-to-even."""
    x = (x[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
    return Image.fromarray((x * 255).round().astype(np.uint8))


def check_fits(sd, clip_vision, plugin):
    """Raise ValueError (one line) when a plugin's widths do not fit the loaded UNet / CLIP vision model."""
    unet, clip = getattr(sd.unet, "cfg", None), getattr(clip_vision, "cfg", None)
    pairs = [("TPB input vs CLIP width", plugin.tpb.cfg.clip_dim, clip and clip.width),
             ("TPB output vs UNet context", plugin.tpb.cfg.context_dim, unet and unet.context_dim),
             ("SCB width vs UNet level 0", plugin.scb.cfg.channels, unet and unet.model_channels)]
    for what, mine, theirs in pairs:
        if theirs is not None and mine != theirs:
            raise ValueError(f"plugin {plugin.task!r} does not fit these models: {what} {mine} != {theirs} "
                             "(Diff-Plugin needs SD 1.x and CLIP ViT-L/14)")


@torch.no_grad()
def clip_features(clip_vision, image):
    """CLIP patch tokens the TPB reads: hidden_states[24][:, 1:] of ViT-L/14 (the last layer's output before
    the post-LayerNorm, CLS dropped) -> [1, 256, 1024]. The official code feeds the ORIGINAL photo."""
    from minidiff.clip import clip_preprocess
    p = next(clip_vision.parameters())
    out = clip_vision(clip_preprocess(image.convert("RGB")).to(p.device, p.dtype))
    return out.hidden_states[-1][:, 1:]  # [-1] == [24] for ViT-L/14 (24 layers); drop CLS -> [1, 256, D]


@torch.no_grad()
def run_plugin(sd, plugin, feats, image, steps, seed, bar=None):
    """One official plugin pass (infer.py l.108-160): `steps` UniPC steps from the photo `image` -> PIL."""
    from minidiff.schedulers import add_noise, make_sampler
    from minidiff.vae import LATENT_SCALE
    p = next(sd.unet.parameters())
    context = plugin.tpb(feats.to(p.device, p.dtype))  # [1, 256, 768] replaces the text context everywhere
    mean, _ = sd.vae.encode(pil_to_tensor(image).to(p.device, p.dtype))
    cond = LATENT_SCALE * mean  # [1, 4, H/8, W/8]: posterior mean, no sampling (infer.py l.112)
    # one CPU draw, seeded per plugin, so a seed means what it means in the official code
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1,) + tuple(cond.shape[1:]), generator=g).to(p.device, p.dtype)  # [1, 4, H/8, W/8]
    pure = plugin.task in PURE_NOISE_TASKS
    sampler = make_sampler("unipc", steps)
    x = noise
    for i, t in enumerate(sampler.timesteps):
        if not pure and t >= RENOISE_FROM:
            x = add_noise(cond, noise, t)  # checked at every step: only t=999 for 20 or 3 steps
        residuals = plugin.scb(cond, t, context)  # 3 x [1, 320, H/8, W/8]
        eps = sd.unet(x, t, context, skip_residuals=dict(enumerate(residuals)))
        x = sampler.step(eps, i, x)
        if bar is not None:
            bar.update(1)
    return tensor_to_pil(sd.vae.decode(x / LATENT_SCALE))


@torch.no_grad()
def restore(sd, clip_vision, plugins, image, *, steps=20, chain_steps=3, seed=42, progress=True,
            clip_image=None, features=None):
    """Run `plugins` one after another on `image` (each on the previous output), as the official demo.

    image: the photo at its processing size (call official_resize, or your own cap, first; it is rescaled
    to multiples of 8 if needed). clip_image: the photo CLIP sees, for every plugin; the official code uses
    the ORIGINAL loaded photo, before the 512 resize (default: `image`); features: its clip_features(), when
    already computed (the selector needs the same ones). The first plugin samples `steps`
    UniPC steps, later ones `chain_steps` (demo.py: 3); the noise generator is re-seeded with `seed` for
    each plugin. No plugins: the photo comes back unchanged. Returns a PIL image of the processing size.
    """
    from tqdm import tqdm
    image = to_multiple_of_8(image.convert("RGB"))
    if not plugins:
        return image
    for plugin in plugins:
        check_fits(sd, clip_vision, plugin)
    feats = features if features is not None else \
        clip_features(clip_vision, image if clip_image is None else clip_image)  # [1, 256, clip_dim]
    total = steps + chain_steps * (len(plugins) - 1)
    with tqdm(total=total, disable=not progress, desc="restore", unit="step") as bar:
        for k, plugin in enumerate(plugins):
            bar.set_postfix_str(plugin.task)
            image = run_plugin(sd, plugin, feats, image, steps if k == 0 else chain_steps, seed, bar)
    return image
