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

    plugin = load_plugin("pre-trained/derain")   # minidiff.plugin.files; or "plugins/derain.safetensors"
    photo = load_image(...)                       # minidiff.io.imageio: the photo as loaded (EXIF-rotated RGB)
    out = restore(sd, clip_vision, [plugin], official_resize(photo), clip_image=photo)
    out = restore(..., compile=True)              # GPU: SCB + UNet compiled, replayed as a CUDA graph
"""
import functools
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from tqdm import tqdm

from minidiff.errors import NonFiniteError, PluginMismatchError  # noqa: F401 (raised here, imported from here)
from minidiff.models.clip import clip_preprocess
from minidiff.io.imageio import pil_to_tensor, tensor_to_pil, to_multiple_of_8
from minidiff.models.layers import embed_timesteps
from minidiff.models.prepack import return_freed_memory
from minidiff.diffusion.schedulers import add_noise, make_sampler
from minidiff.models.unet import ResBlock, SpatialTransformer

# The eight official tasks, in the official demo's order (demo.py l.32): selection and chaining follow it.
TASKS = ("derain", "desnow", "lowlight", "dehaze", "deblur", "highlight", "face", "demoire")
# Tasks whose sampling starts from pure noise instead of the re-noised input latent (demo.py l.179-182).
PURE_NOISE_TASKS = ("lowlight", "highlight")
RENOISE_FROM = 960  # infer.py `time_threshold`: at every step with t >= this, x = add_noise(cond, noise, t)


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
        """cond [B, 4, h, w] (latent_scale x posterior mean of the photo), t (int, 0-d or [B]), context
        [B, N, context_dim] (TPB tokens) -> list of 3 residuals [B, channels, h, w]."""
        emb = self.time_embed(embed_timesteps(t, cond, self.cfg.channels))  # [B, 4 * channels]
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
# The official restoration loop (infer.py l.86-160, demo.py l.160-251).
# --------------------------------------------------------------------------------------------------------

def check_fits(sd, clip_vision, plugin):
    """Raise PluginMismatchError (one line) when a plugin's widths do not fit the loaded UNet / CLIP vision
    model."""
    unet, clip = getattr(sd.unet, "cfg", None), getattr(clip_vision, "cfg", None)
    pairs = [("TPB input vs CLIP width", plugin.tpb.cfg.clip_dim, clip and clip.width),
             ("TPB output vs UNet context", plugin.tpb.cfg.context_dim, unet and unet.context_dim),
             ("SCB width vs UNet level 0", plugin.scb.cfg.channels, unet and unet.model_channels)]
    for what, mine, theirs in pairs:
        if theirs is not None and mine != theirs:
            raise PluginMismatchError(f"plugin {plugin.task!r} does not fit these models: {what} {mine} != "
                                      f"{theirs} (Diff-Plugin needs SD 1.x and CLIP ViT-L/14)")


@torch.no_grad()
def clip_features(clip_vision, image):
    """CLIP patch tokens the TPB reads: hidden_states[24][:, 1:] of ViT-L/14 (the last layer's output before
    the post-LayerNorm, CLS dropped) -> [1, 256, 1024]. The official code feeds the ORIGINAL photo."""
    p = next(clip_vision.parameters())
    size = getattr(getattr(clip_vision, "cfg", None), "image_size", 224)  # 224 for ViT-L/14
    out = clip_vision(clip_preprocess(image.convert("RGB"), size).to(p.device, p.dtype))
    return out.hidden_states[-1][:, 1:]  # [-1] == [24] for ViT-L/14 (24 layers); drop CLS -> [1, 256, D]


def denoise_step(unet, scb, x, t, cond, context):
    """One model evaluation of the restore loop: the SCB's residuals from the photo's latent `cond`, added to
    the UNet's skips 0-2, and the UNet's eps prediction at the noisy latent x [1, 4, h, w] -> [1, 4, h, w].
    t: a 0-d tensor (a Python int would be baked into a compiled graph: one compile per step)."""
    residuals = scb(cond, t, context)  # 3 x [1, 320, h, w]
    return unet(x, t, context, skip_residuals=dict(enumerate(residuals)))


@functools.cache
def compiled_denoise_step(device_type):
    """denoise_step through torch.compile, made once per device type and reused by every plugin and photo.

    Static shapes (dynamic=False): each image size and dtype compiles once (tools/bench/benchmark_gpu.py reports
    how long: first_s), then every step and every plugin of that size reuses the graph: the timestep is a
    tensor input and the weights are inputs too, so another plugin's SCB (same sizes, other weights) needs no
    new compile. Past torch._dynamo.config.recompile_limit (8) sizes in one process, new sizes run eager.
    On CUDA the graph is replayed as a CUDA graph (mode="reduce-overhead"): one launch per step instead of
    hundreds of kernel launches, whose CPU cost at 512x512 and batch 1 is of the order of the GPU work.
    """
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    return torch.compile(denoise_step, dynamic=False, fullgraph=True, mode=mode)


@torch.no_grad()
def run_plugin(sd, plugin, feats, image, steps, seed, bar=None, compile=False):
    """One official plugin pass (infer.py l.108-160): `steps` UniPC steps from the photo `image` -> PIL.
    compile: SCB + UNet through compiled_denoise_step (the first call of an image size compiles)."""
    p = next(sd.unet.parameters())
    context = plugin.tpb(feats.to(p.device, p.dtype))  # [1, 256, 768] replaces the text context everywhere
    mean, _ = sd.vae.encode(pil_to_tensor(image).to(p.device, p.dtype))
    cond = sd.vae.cfg.latent_scale * mean  # [1, 4, H/8, W/8]: posterior mean, no sampling (infer.py l.112)
    # one CPU draw, seeded per plugin, so a seed means what it means in the official code
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1,) + tuple(cond.shape[1:]), generator=g).to(p.device, p.dtype)  # [1, 4, H/8, W/8]
    pure = plugin.task in PURE_NOISE_TASKS
    sampler = make_sampler("unipc", steps)
    step = compiled_denoise_step(p.device.type) if compile else denoise_step
    on_device = sampler.timesteps.to(p.device)  # [steps]: the models' t, no host copy inside a (CUDA) graph
    x = noise
    for i, t in enumerate(sampler.timesteps):
        if not pure and t >= RENOISE_FROM:
            x = add_noise(cond, noise, t)  # checked at every step: only t=999 for 20 or 3 steps
        eps = step(sd.unet, plugin.scb, x, on_device[i], cond, context)  # [1, 4, H/8, W/8]
        x = sampler.step(eps, i, x)
        if not torch.isfinite(x).all():  # e.g. fp16 overflow or a broken weight: stop before decoding
            raise NonFiniteError(f"plugin {plugin.task!r}: the latent is not finite after step {i + 1} of "
                                 f"{len(sampler.timesteps)} (t={int(t)})")
        if bar is not None:
            bar.update(1)
    if x.device.type == "cpu":  # the encoder's and the steps' freed buffers go back before the decoder's
        return_freed_memory()   # large ones are allocated: the peak of a CPU restore is the decode
    return tensor_to_pil(sd.vae.decode(x / sd.vae.cfg.latent_scale))


@torch.no_grad()
def restore(sd, clip_vision, plugins, image, *, steps=20, chain_steps=3, seed=42, progress=True,
            clip_image=None, features=None, compile=False):
    """Run `plugins` one after another on `image` (each on the previous output), as the official demo.

    image: the photo at its processing size (call official_resize, or your own cap, first; it is rescaled
    to multiples of 8 if needed). clip_image: the photo CLIP sees, for every plugin; the official code uses
    the ORIGINAL loaded photo, before the 512 resize (default: `image`); features: its clip_features(), when
    already computed (the selector needs the same ones). The first plugin samples `steps`
    UniPC steps, later ones `chain_steps` (demo.py: 3); the noise generator is re-seeded with `seed` for
    each plugin. No plugins: the photo comes back unchanged. Returns a PIL image of the processing size.
    compile: run SCB + UNet through torch.compile (compiled_denoise_step; for GPUs: on a CPU compiling costs
    minutes and saves little). Each new image size compiles once; the steps and the plugins reuse it.
    """
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
            image = run_plugin(sd, plugin, feats, image, steps if k == 0 else chain_steps, seed, bar, compile)
    return image
