"""The Stable Diffusion 1.x variational autoencoder (AutoencoderKL "KL-f8": 8x downscale, 4 latent channels).

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022),
section 3.1 and appendix G (the first-stage autoencoder with a KL penalty).
Reference implementation mirrored: CompVis/stable-diffusion @ 21f890f, ldm/models/autoencoder.py
(AutoencoderKL) and ldm/modules/diffusionmodules/model.py (Encoder, Decoder, ResnetBlock, AttnBlock,
Downsample, Upsample).
Parameter names are those of the original single-file checkpoint (`first_stage_model.*` minus the prefix), so
`encoder.down.1.block.0.nin_shortcut.weight` in a file is `vae.encoder.down[1].block[0].nin_shortcut.weight`.
The diffusers names (down_blocks / up_blocks / mid_block / to_q ...) are a rename table in weights.py.

    vae = AutoencoderKL(VAEConfig())
    mean, logvar = vae.encode(images)              # images [B, 3, H, W] in [-1, 1] -> [B, 4, H//8, W//8]
    latents = LATENT_SCALE * mean                  # what the UNet sees (training samples mean + std * noise)
    images = vae.decode(latents / LATENT_SCALE)    # [B, 3, 8h, 8w], roughly in [-1, 1]

Images over TILE_ABOVE pixels (and latents of such images) are encoded and decoded in overlapping tiles,
blended where they overlap, so that the full-resolution activations of a big photo never exist at once. The
algorithm is diffusers' AutoencoderKL.enable_tiling() (diffusers 0.35.2, autoencoders/autoencoder_kl.py:
_tiled_encode, tiled_decode, blend_v, blend_h), whose result it reproduces.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff.models.layers import GroupNorm, attention

# SD-1.x latents are the VAE posterior scaled by this factor, chosen by CompVis so that the latents of the
# training images have about unit variance (configs/stable-diffusion/v1-inference.yaml `scale_factor`).
LATENT_SCALE = 0.18215  # SD 1.x's latent_scale (VAEConfig default), exported for callers of SD files

GROUPS = 32  # GroupNorm groups everywhere in the VAE (CompVis Normalize(); diffusers norm_num_groups)
EPS = 1e-6  # GroupNorm epsilon everywhere in the VAE (not torch's 1e-5 default)


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters; defaults are SD-1.x's first stage (v1-inference.yaml `ddconfig`)."""
    in_channels: int = 3  # image channels in (RGB)
    out_channels: int = 3  # image channels out
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 2, 4, 4)  # one entry per resolution level; len-1 downsamplings -> 8x
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more per level)
    z_channels: int = 4  # latent channels (the encoder emits 2 * z: mean and log-variance)
    # latents the UNet sees = latent_scale x VAE latents: 1 / std of the training set's latents, measured
    # once per VAE (SD's 0.18215; minidiff's small VAE stores its own in its file's metadata)
    latent_scale: float = 0.18215


# A tiny configuration of the same architecture for fast tests (2 levels -> 2x downscale).
TINY_VAE = replace(VAEConfig(), ch=32, ch_mult=(1, 2), num_res_blocks=1)


# Tiling. Each tile is a whole network run: GroupNorm statistics and the mid-block attention see one tile,
# not the photo, so a tiled result differs from the untiled one (random full-size weights, 1 MP photo: mean
# |difference| 0.15 on images of mean |value| 0.58, tools/bench/bench_memory.py --vae-only). So tiles start only
# above TILE_ABOVE pixels: every size the official demo makes (short side 512-1024, up to 1536x1024 for a
# 3:2 photo) stays one pass, bit-identical to diffusers' plain encode/decode. Above it the VAE's memory stops
# growing with the photo: fp32 CPU encode + decode peak RSS 4.16 GiB untiled at 1 MP (about +2.8 GiB per
# MP, so ~18 GiB at 6 MP), tiled 1.50 GiB at 0.25 MP and 1.57 GiB at 1 MP (the same measurement); a whole
# restore at 2 MP peaks at 6.82 GiB tiled, 11.38 GiB untiled (tools/bench/bench_memory.py).
TILE = 512  # tile side in image pixels (TILE // 8 = 64 latent cells): SD's training size, diffusers' default
TILE_OVERLAP = 0.25  # fraction of a tile shared with the next one (diffusers' tile_overlap_factor)
TILE_ABOVE = 1536 * 1024  # images (or latents of images) of more pixels than this go through tiles


def blend(a, b, extent, dim):
    """Fade tile `b`'s first `extent` rows (dim=2) or columns (dim=3) in from the last ones of its
    neighbour `a` (above or left), linearly: weight i/extent on b, 1 - i/extent on a. Writes into b
    (diffusers' blend_v / blend_h) and returns it."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    # weights in float64 then cast, as diffusers' Python-float factors: [1, 1, extent, 1] or [1, 1, 1, extent]
    w = (torch.arange(extent, dtype=torch.float64) / extent).reshape(shape)
    head, tail = b.narrow(dim, 0, extent), a.narrow(dim, a.shape[dim] - extent, extent)
    head.copy_(tail * (1 - w).to(b.dtype) + head * w.to(b.dtype))
    return b


def tiled(fn, x, tile, out_tile, overlap=TILE_OVERLAP):
    """Run `fn` (an encoder or decoder: [B, C, h, w] -> [B, C', h*s, w*s]) on `tile` x `tile` crops of
    x [B, C, H, W] taken every int(tile * (1 - overlap)) cells, and put the outputs (`out_tile` side for a
    full tile) back together: each output overlaps its upper and left neighbours by int(out_tile * overlap)
    cells, blended (`blend`), then keeps its first out_tile - that many rows and columns. Edge crops are
    smaller."""
    stride = int(tile * (1 - overlap))  # input cells between tile starts
    extent = int(out_tile * overlap)  # output cells blended with the previous tile
    keep = out_tile - extent  # output cells each tile contributes (= stride * scale for full tiles)
    rows = [[fn(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]  # rows[i][j]: [B, C', <=out_tile, <=out_tile]
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            # blend in place and in this order, as diffusers: the left neighbour was already blended with
            # the one above it
            if i > 0:
                blend(rows[i - 1][j], row[j], extent, dim=2)
            if j > 0:
                blend(row[j - 1], row[j], extent, dim=3)
        out_rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))  # [B, C', <=keep, W']
    return torch.cat(out_rows, dim=2)  # [B, C', H', W']


def Normalize(channels):
    return GroupNorm(GROUPS, channels, eps=EPS)  # accurate on channels-last input (models/layers.py)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 conv shortcut when the width changes (no time embedding)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # CompVis calls the 1x1 shortcut nin_shortcut ("network in network"), diffusers conv_shortcut.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout (0 in SD) omitted: inference only
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as the q/k/v/output projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # 1x1 convs, then flatten the image into a sequence of H*W tokens of width C
        q = self.q(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        k = self.k(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        v = self.v(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        h = attention(q, k, v, heads=1)  # softmax(q k^T / sqrt(C)) v, [B, HW, C]
        h = h.transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom by one (CompVis' asymmetric padding, kept for
    checkpoint compatibility): a side H becomes H // 2 (an odd one loses its last row)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad (left, right, top, bottom) with zeros


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock - self-attention - ResnetBlock at the lowest resolution (CompVis: `mid.*`)."""

    def __init__(self, ch):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (a list of ResnetBlocks) then an optional `downsample` or `upsample`."""

    def __init__(self, blocks, resample_name=None, resample=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)  # named as in the checkpoint: downsample / upsample

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class Encoder(nn.Module):
    """Image [B, in, H, W] -> moments [B, 2z, H//8, W//8] (mean and log-variance, before quant_conv)."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            blocks = [ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            # every level but the last halves the resolution
            down = None if last else Downsample(out_ch)
            self.down.append(Level(blocks, None if last else "downsample", down))
            in_ch = out_ch
        self.mid = MidBlock(in_ch)
        self.norm_out = Normalize(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent z [B, z, h, w] -> image [B, out, 8h, 8w]."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # CompVis builds the levels from the lowest resolution up, but stores them at the index of the
        # encoder level: up[len-1] runs first, up[0] last (the reverse of diffusers' up_blocks order).
        levels = []
        in_ch = widths[-1]
        for i in reversed(range(len(widths))):
            out_ch = widths[i]
            # one more ResnetBlock per level than the encoder has
            n = cfg.num_res_blocks + 1
            blocks = [ResnetBlock(in_ch if j == 0 else out_ch, out_ch) for j in range(n)]
            first = i == 0
            levels.append(Level(blocks, None if first else "upsample", None if first else Upsample(out_ch)))
            in_ch = out_ch
        self.up = nn.ModuleList(reversed(levels))  # up[i] belongs to resolution level i
        self.norm_out = Normalize(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Encoder + Gaussian posterior + decoder; quant_conv / post_quant_conv: 1x1 convs around the latent."""

    def __init__(self, cfg=VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.scale = 2 ** (len(cfg.ch_mult) - 1)  # image side / latent side: 8 for SD
        # tile side (image pixels) and the image size in pixels above which tiles are used (0: always)
        self.tile, self.tile_above = TILE, TILE_ABOVE

    def encode(self, x):
        """Images [B, 3, H, W] in [-1, 1] -> (mean, logvar) of the posterior, each [B, z, H//8, W//8].

        A latent sample is mean + exp(0.5 * logvar) * noise; the posterior mode is `mean` (Diff-Plugin's SCB
        condition). logvar is clamped to [-30, 20] as CompVis' DiagonalGaussianDistribution does.
        Images over `tile_above` pixels go through overlapping tiles (see TILE_ABOVE).
        """
        if x.shape[2] * x.shape[3] > self.tile_above:
            moments = tiled(lambda t: self.quant_conv(self.encoder(t)), x, self.tile, self.tile // self.scale)
        else:
            moments = self.quant_conv(self.encoder(x))  # [B, 2z, h, w]
        mean, logvar = moments.chunk(2, dim=1)  # 2 x [B, z, h, w]
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Unscaled latents [B, z, h, w] (SD latents / LATENT_SCALE) -> images [B, 3, 8h, 8w], ~[-1, 1].
        Latents of images over `tile_above` pixels go through overlapping tiles (see TILE_ABOVE)."""
        if z.shape[2] * z.shape[3] * self.scale ** 2 > self.tile_above:
            decode = lambda t: self.decoder(self.post_quant_conv(t))  # noqa: E731
            return tiled(decode, z, self.tile // self.scale, self.tile)
        return self.decoder(self.post_quant_conv(z))
