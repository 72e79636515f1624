"""CLIP text and vision transformers, and CLIP's image preprocessing.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021).
Stable Diffusion 1.x conditions its UNet on the text tower of CLIP ViT-L/14 (hidden states after the final
LayerNorm, [B, 77, 768]); Diff-Plugin's Task-Plugins read the vision tower of CLIP ViT-L/14
(hidden_states[24], the last layer before the post-LayerNorm); CLIP-FID (clean-fid) uses ViT-B/32's projected
image embedding.

Reference implementations mirrored:
  - openai/CLIP, clip/model.py (commit 0845fc4): VisionTransformer, ResidualAttentionBlock, QuickGELU.
  - huggingface/transformers v4.57, src/transformers/models/clip/modeling_clip.py: the module names, which
    the SD single file (cond_stage_model.transformer.text_model.*) and the Hugging Face CLIP files both use,
    so those files load with no renames. OpenAI `visual.*` state dicts are renamed in weights.py (a table).
  - transformers v4.57, models/clip/image_processing_clip.py + image_transforms.py: `clip_preprocess`.

Both towers are pre-LayerNorm transformers built from one block (`CLIPEncoderLayer`); the text tower is
causal.
"""
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from minidiff.models.layers import attention

# OpenAI's normalisation constants (clip/clip.py _transform; transformers' OPENAI_CLIP_MEAN / _STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower. Defaults: CLIP ViT-L/14's, the text encoder of Stable Diffusion 1.x."""
    vocab_size: int = 49408  # BPE vocabulary incl. <|startoftext|> 49406 and <|endoftext|> 49407
    max_positions: int = 77  # context length: prompts are padded/truncated to 77 tokens
    width: int = 768
    layers: int = 12
    heads: int = 12  # OpenAI's rule: width // 64 (head dim 64)
    mlp: int = 3072  # 4 * width
    act: str = "quick_gelu"  # x * sigmoid(1.702 x), OpenAI's approximation of GELU
    eps: float = 1e-5  # LayerNorm epsilon


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower (a ViT). Defaults: CLIP ViT-L/14 at 224x224, Diff-Plugin's image encoder."""
    image_size: int = 224
    patch_size: int = 14  # 224 / 14 = 16 -> 16 x 16 = 256 patch tokens + 1 class token
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp: int = 4096
    projection: int | None = 768  # visual_projection output size; None: the file has no projection
    act: str = "quick_gelu"
    eps: float = 1e-5


CLIP_TEXT_L14 = CLIPTextConfig()
CLIP_VISION_L14 = CLIPVisionConfig()
# ViT-B/32: clean-fid's CLIP-FID feature extractor (ViT-B-32.pt); 7 x 7 = 49 patches + class token.
CLIP_VISION_B32 = CLIPVisionConfig(patch_size=32, width=768, layers=12, heads=12, mlp=3072, projection=512)
# Tiny presets for tests. Head dim stays 64 (the loaders infer heads = width // 64 without a config.json);
# the tiny ViT keeps 24 layers so that hidden_states[24] (Diff-Plugin's TPB input) exists.
TINY_CLIP_TEXT = replace(CLIP_TEXT_L14, width=128, layers=2, heads=2, mlp=256)
TINY_CLIP_VISION = replace(CLIP_VISION_L14, width=128, heads=2, mlp=256, projection=32)
TINY_CLIP_VISION_B32 = replace(CLIP_VISION_B32, width=128, layers=2, heads=2, mlp=256, projection=32)


# ----------------------------------------------------------------------------------------------------------
# The shared transformer block


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (OpenAI fuses them: weights.py splits)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        # scale 1/sqrt(head_dim) is SDPA's default, the same as CLIP's
        h = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=causal)  # [B, N, C]
        return self.out_proj(h)


class CLIPMLP(nn.Module):
    """Two-layer feed-forward network, width -> mlp -> width."""

    def __init__(self, width, mlp, act):
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported CLIP activation {act!r} (quick_gelu or gelu)")
        self.act = act
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x):
        h = self.fc1(x)
        # quick_gelu is what every OpenAI CLIP (and so SD 1.x) was trained with; exact GELU for other CLIPs
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else nn.functional.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block of both towers (OpenAI's ResidualAttentionBlock)."""

    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp, cfg.act)

    def forward(self, x, causal=False):
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)  # attention sub-layer + residual
        x = x + self.mlp(self.layer_norm2(x))  # feed-forward sub-layer + residual
        return x


class CLIPEncoder(nn.Module):
    """A stack of blocks; holds them as `layers` so that the parameter names match the checkpoints."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])


# ----------------------------------------------------------------------------------------------------------
# Text tower


def _normal(shape, std):
    """A tensor drawn from N(0, std^2), left empty on the meta device: there the loader fills it, and a random
    draw on meta would import torch's Python decompositions (about 800 modules, 1 s of every load) for
    nothing."""
    w = torch.empty(shape)
    return w if w.is_meta else w.normal_(0.0, std)


def _embedding(n, width):
    """nn.Embedding(n, width) with its usual N(0, 1) init (skipped on the meta device, see _normal)."""
    return nn.Embedding(n, width, _weight=_normal((n, width), 1.0))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = _embedding(cfg.max_positions, cfg.width)  # learned, absolute

    def forward(self, ids):
        # Position ids are made here rather than kept as a buffer: a non-persistent buffer would stay on the
        # meta device when the model is built there and filled from a checkpoint.
        pos = torch.arange(ids.shape[1], device=ids.device)  # [N]
        return self.token_embedding(ids) + self.position_embedding(pos)  # [B, N, C]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids):
        x = self.embeddings(ids)  # [B, N, C]
        for layer in self.encoder.layers:
            x = layer(x, causal=True)  # token i sees tokens 0..i only
        x = self.final_layer_norm(x)
        # Pooled output at the end-of-text token. <|endoftext|> (49407) is the largest id, and padding
        # repeats it, so argmax finds the FIRST end-of-text (torch.argmax returns the first maximum): what
        # transformers does for configs with eos_token_id 2, which SD 1.x's and Diff-Plugin's encoder have.
        eot = ids.argmax(dim=-1)  # [B]
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, C]
        return x, pooled


class CLIPTextModel(nn.Module):
    """CLIP text encoder: `hidden, pooled = m(ids)`, ids [B, 77] -> [B, 77, width] (after the final
    LayerNorm: SD's cross-attention context) and [B, width] (that state at the first end-of-text token)."""

    def __init__(self, cfg=CLIP_TEXT_L14):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids):
        # Documented boundary: token ids (a CPU LongTensor from the tokenizer) move to the weights' device.
        return self.text_model(ids.to(self.text_model.embeddings.token_embedding.weight.device))


# ----------------------------------------------------------------------------------------------------------
# Vision tower


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.image_size = cfg.image_size
        grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(_normal(cfg.width, cfg.width**-0.5))  # learned [CLS] token
        # A patch_size-strided conv = a linear map of each non-overlapping patch (no bias: OpenAI's conv1).
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = _embedding(grid * grid + 1, cfg.width)

    def forward(self, pixels):
        B, _, H, W = pixels.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP vision expects {self.image_size}x{self.image_size} pixels, got {H}x{W} "
                             "(use clip_preprocess)")
        x = self.patch_embedding(pixels)  # [B, C, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, C], patches in row-major order
        cls = self.class_embedding.expand(B, 1, -1)  # [B, 1, C]
        x = torch.cat([cls, x], dim=1)  # [B, 1 + grid*grid, C], class token first
        return x + self.position_embedding.weight  # [B, T, C] (+ [T, C] broadcast)


@dataclass
class CLIPVisionOutput:
    hidden_states: tuple  # layers + 1 tensors [B, T, width]: [0] after pre-LN, [k] after block k
    pooled: torch.Tensor  # [B, width]: post-LayerNorm class token
    image_embeds: torch.Tensor | None  # [B, projection]: pooled @ projection, None without a projection


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # sic: the Hugging Face spelling
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))  # [B, T, C]; ViTs usually have no LN here, CLIP does
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)  # bidirectional: every token sees every token
            hidden_states.append(x)
        pooled = self.post_layernorm(x[:, 0])  # [B, C]: the class token summarises the image
        return tuple(hidden_states), pooled


class CLIPVisionModel(nn.Module):
    """CLIP image encoder: `out = m(pixels)`, pixels [B, 3, 224, 224] from `clip_preprocess`.

    out.hidden_states[k] [B, 1 + patches, width] (k = 0..layers; ViT-L/14: 25 tensors, [24] = last block),
    out.pooled [B, width], out.image_embeds [B, projection] (None when cfg.projection is None).
    """

    def __init__(self, cfg=CLIP_VISION_L14):
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        # OpenAI's `proj` is stored transposed ([width, projection]); here a bias-free Linear as in HF.
        self.visual_projection = None
        if cfg.projection is not None:
            self.visual_projection = nn.Linear(cfg.width, cfg.projection, bias=False)

    def forward(self, pixels):
        # Documented boundary: pixels (float32 from clip_preprocess) take the weights' dtype and device.
        w = self.vision_model.embeddings.patch_embedding.weight
        hidden_states, pooled = self.vision_model(pixels.to(dtype=w.dtype, device=w.device))
        embeds = None if self.visual_projection is None else self.visual_projection(pooled)  # [B, proj]
        return CLIPVisionOutput(hidden_states, pooled, embeds)


# ----------------------------------------------------------------------------------------------------------
# Image preprocessing


def _preprocess_one(image, size):
    """One PIL image -> [3, size, size] float32, step by step as transformers 4.x CLIPImageProcessor."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    # 1. Resize the short side to `size`; the long side keeps the aspect ratio, TRUNCATED by int() (not
    #    rounded), computed as size * long / short in this order (get_resize_output_image_size).
    #    Images smaller than `size` are enlarged the same way.
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)  # PIL bicubic on uint8, as transformers
    # 2. Centre crop; an odd excess leaves the extra row/column at the bottom/right.
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = torch.from_numpy(np.asarray(image)[top:top + size, left:left + size].copy())  # [size, size, 3] uint8
    # 3. Rescale in float64, then float32 (transformers' rescale), then normalise in float32: bit-exact.
    x = (x.double() * (1 / 255)).float()
    x = (x - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)  # [size, size, 3]
    return x.permute(2, 0, 1)  # [3, size, size]


def clip_preprocess(images, size=224):
    """PIL image or list of PIL images -> [B, 3, size, size] float32, CLIP-normalised.

    Equals transformers 4.x CLIPImageProcessor() with its defaults (convert RGB, bicubic resize of the short
    side, centre crop, /255, OpenAI mean/std). One deviation: transformers guesses the channel axis from the
    array shape and so misreads images 1 or 3 pixels high (a 1x1 image raises); here it is never guessed.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("clip_preprocess: no images")
    return torch.stack([_preprocess_one(im, size) for im in images])  # [B, 3, size, size]
