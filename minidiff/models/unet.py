"""The Stable Diffusion 1.x denoising UNet, in the original CompVis ldm structure and parameter names.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022), the
conditional UNet of Ho et al. / Dhariwal & Nichol with cross-attention transformers on the text embedding.
Mirrors CompVis/stable-diffusion @ 21f890f, ldm/modules/diffusionmodules/openaimodel.py (UNetModel, ResBlock,
Downsample, Upsample, TimestepEmbedSequential) and ldm/modules/attention.py (SpatialTransformer,
BasicTransformerBlock, CrossAttention, GEGLU); numerics checked against diffusers 0.35.2
src/diffusers/models/unets/unet_2d_condition.py (UNet2DConditionModel), which the parity tests compare with.

Parameter names are those of the original single-file checkpoint under `model.diffusion_model.`, so a key from
v1-5-pruned-emaonly.safetensors greps straight into this file:
  time_embed.{0,2}                      timestep MLP
  input_blocks.0.0                      conv_in
  input_blocks.N.{0,1}                  ResBlock [+ SpatialTransformer], or input_blocks.N.0.op (Downsample)
  middle_block.{0,1,2}                  ResBlock, SpatialTransformer, ResBlock
  output_blocks.N.{0,1,2}               ResBlock [+ SpatialTransformer] [+ Upsample .conv]
  out.{0,2}                             GroupNorm, conv_out
Other layouts (diffusers folders, the diffusers-named Diff-Plugin SCB) are rename tables in weights.py.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff.models.layers import GroupNorm, attention, embed_timesteps


@dataclass(frozen=True)
class UNetConfig:
    """SD-1.x UNet hyper-parameters (CompVis v1-inference.yaml unet_config.params); defaults = SD 1.5."""
    in_channels: int = 4  # latent channels (9 would be the inpainting UNet, which minidiff does not load)
    out_channels: int = 4  # predicted eps has the latent's channels
    model_channels: int = 320  # width of level 0; the time embedding is 4x this wide
    channel_mult: tuple = (1, 2, 4, 4)  # width of each resolution level, in units of model_channels
    num_res_blocks: int = 2  # ResBlocks per level on the way down (the way up has one more)
    # levels with a SpatialTransformer after each ResBlock (yaml: 4, 2, 1)
    attention_levels: tuple = (0, 1, 2)
    heads: int = 8  # attention heads in every SpatialTransformer (SD 1.x: num_heads 8, head width varies)
    context_dim: int = 768  # width of the cross-attention context (CLIP ViT-L/14 text hidden states)
    groups: int = 32  # GroupNorm groups everywhere


# Test-sized UNet with the SD 1.x block pattern: 4 levels, 2 ResBlocks each, so the same 12 skips (0..11)
# exist as in SD 1.5 and Diff-Plugin's SCB residuals land on skips 0, 1, 2 at full latent resolution.
TINY_UNET = replace(UNetConfig(), model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=32)


class ResBlock(nn.Module):
    """GN-SiLU-conv, plus the projected time embedding, GN-SiLU-conv, plus the (1x1-projected) input."""

    def __init__(self, in_ch, out_ch, emb_ch, groups=32):
        super().__init__()
        # SiLU in place on the GroupNorm output: one activation-sized buffer less per norm (GroupNorm's backward
        # needs its input, not its output, so this is safe under autograd too)
        self.in_layers = nn.Sequential(GroupNorm(groups, in_ch, nchw_copy=True), nn.SiLU(inplace=True),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        # index 2 is Dropout in CompVis (p=0 at inference); kept so that conv stays at out_layers.3
        self.out_layers = nn.Sequential(GroupNorm(groups, out_ch, nchw_copy=True), nn.SiLU(inplace=True),
                                        nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        # x: [B, in_ch, H, W], emb: [B, emb_ch] -> [B, out_ch, H, W]. The adds go in place into the conv outputs
        # (a convolution's backward does not need its output), so no extra activation-sized buffers.
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None]  # [B, out_ch, 1, 1] broadcast over space
        h = self.out_layers(h)
        return h.add_(self.skip_connection(x))  # = skip(x) + h: float addition commutes exactly


class CrossAttention(nn.Module):
    """Multi-head attention from queries of width `dim` onto a context of width `context_dim`
    (self-attention if equal)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # CompVis: Sequential(Linear, Dropout) -> key to_out.0
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None):
        # x: [B, N, dim], context: [B, M, context_dim] (None: self-attention) -> [B, N, dim]
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives value and gate; exact (erf) GELU as in
    CompVis/diffusers."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)  # 2 x [B, N, inner]
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the context, GEGLU feed-forward (4x wide)."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), CrossAttention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), CrossAttention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        # index 1 is Dropout in CompVis; the output Linear stays at ff.net.2
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x, context):
        # x: [B, N, dim]; every sub-layer is a residual add on the normalised input
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff.net(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, one TransformerBlock over the H*W positions, 1x1 conv out, plus the input."""

    def __init__(self, ch, heads, context_dim, groups=32):
        super().__init__()
        # eps 1e-6 here (CompVis Normalize), 1e-5 in ResBlocks; nchw_copy: bf16 as diffusers' (models/layers.py)
        self.norm = GroupNorm(groups, ch, eps=1e-6, nchw_copy=True)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, heads, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        # x: [B, C, H, W], context: [B, M, context_dim] -> [B, C, H, W]
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # [B, H*W, C]: one token per position
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; odd sizes round up (85 -> 43), as in CompVis and diffusers (padding 1)."""

    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (the next skip's size), then a 3x3 conv.

    Interpolating to the skip's size instead of a fixed x2 makes latents not divisible by 8 work (diffusers
    forward_upsample_size); for even sizes the two are the same nearest-neighbour grid.
    """

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.Sequential):
    """CompVis TimestepEmbedSequential: runs its layers in order, giving each one the input it takes."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:  # conv_in, Downsample
                x = layer(x)
        return x


class UNet(nn.Module):
    """SD-1.x noise-prediction UNet: eps = unet(x, timesteps, context, skip_residuals=None)."""

    def __init__(self, cfg=UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, emb_ch, levels = cfg.model_channels, 4 * cfg.model_channels, len(cfg.channel_mult)

        def res(i, o):
            return ResBlock(i, o, emb_ch, cfg.groups)

        def attn(c):
            return SpatialTransformer(c, cfg.heads, cfg.context_dim, cfg.groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        # Encoder: every entry of input_blocks yields one skip connection (12 for SD 1.x)
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chs, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                self.input_blocks.append(Block(*layers))
                skip_chs.append(ch)
            if level != levels - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skip_chs.append(ch)
        self.middle_block = Block(res(ch, ch), attn(ch), res(ch, ch))
        # Decoder: each entry concatenates one skip (popped last-in first-out) before its ResBlock
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))
        self.out = nn.Sequential(GroupNorm(cfg.groups, ch, nchw_copy=True), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context, skip_residuals=None):
        """x [B, in_ch, h, w], timesteps int | 0-d | [B], context [B, N, context_dim]
        -> eps [B, out_ch, h, w].

        skip_residuals[i] (broadcastable to skip i) is added to skip connection i before the decoder uses it:
        i = 0 is conv_in's output, i = 11 the last encoder ResBlock (ControlNet / Diff-Plugin SCB semantics).
        """
        emb = self.time_embed(embed_timesteps(timesteps, x, self.cfg.model_channels))  # [B, 4*mc]
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        for i, r in (skip_residuals or {}).items():
            if not 0 <= i < len(skips):
                raise ValueError(f"skip_residuals: no skip connection {i} "
                                 f"(this UNet has 0..{len(skips) - 1})")
            skips[i] = skips[i] + r  # a new tensor: the caller's residual and the skip stay untouched
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # [B, ch + skip_ch, h', w']
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.out(h)
