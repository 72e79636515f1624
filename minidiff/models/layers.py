"""Pieces shared by two or more model families: multi-head attention and the sinusoidal timestep embedding.

Attention runs through torch.nn.functional.scaled_dot_product_attention (SDPA: flash / memory-efficient
kernels on the GPU, a fused kernel on the CPU). The explicit softmax(q k^T / sqrt(d)) v path stays beside it,
as in nanoGPT, so a reader sees what SDPA computes and a test can check one against the other.
"""
import math

import torch
import torch.nn.functional as F


def attention(q, k, v, heads, causal=False, sdpa=True):
    """Multi-head scaled dot-product attention on already-projected q, k, v.

    q: [B, Nq, C], k and v: [B, Nk, C], C = heads * head_dim -> [B, Nq, C].
    causal=True masks position j > i (CLIP's text tower).
    """
    B, Nq, C = q.shape
    Nk = k.shape[1]
    d = C // heads
    q = q.view(B, Nq, heads, d).transpose(1, 2)  # [B, H, Nq, d]
    k = k.view(B, Nk, heads, d).transpose(1, 2)  # [B, H, Nk, d]
    v = v.view(B, Nk, heads, d).transpose(1, 2)  # [B, H, Nk, d]
    if sdpa:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, Nq, d]
    else:
        w = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # [B, H, Nq, Nk]
        if causal:
            keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
            w = w.masked_fill(~keep, float("-inf"))
        out = w.softmax(dim=-1) @ v  # [B, H, Nq, d]
    return out.transpose(1, 2).reshape(B, Nq, C)  # [B, Nq, C]


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of diffusion timesteps, cos first (CompVis ldm; diffusers flip_sin_to_cos=True,
    shift 0).

    t: [B] (int or float) -> [B, dim] float32; frequencies exp(-ln(max_period) * k / (dim/2)),
    k = 0 .. dim/2-1.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)  # [half]
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def embed_timesteps(timesteps, x, dim):
    """The UNet's and the SCB's time input: timesteps (int, 0-d or [B]) broadcast to the batch of x
    [B, ...], embedded (timestep_embedding) and cast to x's dtype -> [B, dim]."""
    t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])  # [B]
    return timestep_embedding(t, dim).to(x.dtype)
