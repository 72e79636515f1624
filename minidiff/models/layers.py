"""Pieces shared by two or more model families: multi-head attention, the sinusoidal timestep embedding and a
GroupNorm that stays accurate on channels-last activations.

Attention runs through torch.nn.functional.scaled_dot_product_attention (SDPA: flash / memory-efficient
kernels on the GPU, a fused kernel on the CPU). The explicit softmax(q k^T / sqrt(d)) v path stays beside it,
as in nanoGPT, so a reader sees what SDPA computes and a test can check one against the other.
"""
import math

import torch
import torch.nn as nn
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


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state-dict keys) that shifts each group towards zero before PyTorch's
    channels-last CPU kernel.

    minidiff's conv kernels load channels-last, so UNet and VAE activations are channels-last. PyTorch's
    channels-last GroupNorm (CPU, torch 2.x) takes the variance as E[x^2] - E[x]^2, which cancels when a group's
    mean is large against its spread: measured against fp64 on [1, 320, 64, 64] at mean/std 20 and 200, fp32
    errs 2.2e-4 and 2.7e-2 (the contiguous kernel 4e-7 and 3e-6), bf16 6.2e-3 and 6.4e-1 (bf16 rounding: 3e-3).
    GroupNorm(x) = GroupNorm(x - k) for any k shared by a group, so:
      fp32: k = the group's mean (computed in full); errs 3e-7, about 2x the plain kernel's time.
      bf16, nchw_copy=True (the UNet's norms: its activations are small, [2, 320, 64, 64] at 512 px): the
            NCHW kernel on a contiguous copy, then back to channels-last: the numbers diffusers' bf16 UNet gets
            (its activations are NCHW), bit for bit, and no slower there ([1, 320, 64, 64]: 1.6 ms vs 1.9 ms).
            Even with its mean centred, the channels-last bf16 kernel errs more (5.2e-3 vs 3.1e-3 against
            fp64), which showed as a bf16 UNet 1.25x off diffusers' on an AMX CPU (tests/test_bf16.py).
      bf16, nchw_copy=False (the VAE's: 128-512 channels at up to 512 x 512): k = the group's mean estimated
            on a 16 x 16 sample of each channel, and 0 where that mean is within 4 standard deviations of zero
            (there the kernel's cancellation is harmless). Copies would triple this op's time there
            ([1, 128, 512, 512]: 48 ms, NCHW copy 153 ms, fp32 centring 160 ms; plain kernel 29 ms); the VAE's
            bf16 error stays about diffusers' own (tests/test_bf16.py).
    Contiguous (NCHW) inputs go straight to F.group_norm, whose kernel is accurate.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, nchw_copy=False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.nchw_copy = nchw_copy

    def forward(self, x):
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        B, C, H, W = x.shape
        G = self.num_groups
        if x.dtype == torch.float32:
            mean = x.mean(dim=(2, 3)).view(B, G, C // G).mean(-1)  # [B, G]: equal-size channels: mean of means
            x = x - mean.repeat_interleave(C // G, dim=1)[:, :, None, None]  # [B, C, H, W], group means ~0
            return F.group_norm(x, G, self.weight, self.bias, self.eps)
        if self.nchw_copy:
            y = F.group_norm(x.contiguous(), G, self.weight, self.bias, self.eps)  # [B, C, H, W] NCHW
            return y.contiguous(memory_format=torch.channels_last)
        sample = x[:, :, ::max(1, H // 16), ::max(1, W // 16)].float()  # [B, C, <=16, <=16]
        mean = sample.mean(dim=(2, 3)).view(B, G, C // G).mean(-1)  # [B, G]
        var = sample.square().mean(dim=(2, 3)).view(B, G, C // G).mean(-1) - mean.square()  # [B, G]
        far = mean.square() > 16 * var  # |mean| > 4 std
        shift = torch.where(far, mean, torch.zeros_like(mean)).repeat_interleave(C // G, dim=1)  # [B, C]
        return F.group_norm(x - shift[:, :, None, None].to(x.dtype), G, self.weight, self.bias, self.eps)
