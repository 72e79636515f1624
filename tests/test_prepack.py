"""Tests for minidiff/models/prepack.py: 3x3 convolution kernels packed once for oneDNN (CPU inference).

The packed path runs the same oneDNN kernel as F.conv2d on channels-last inputs, so outputs must equal the
dense model's up to summation-order noise (measured: bit-identical in most layers, <= 1e-5 of max|y| over a
whole UNet); the UNet's parity with diffusers through the packed path is in test_unet.py (tiny and full size).
Run: cd /work/main && python -m pytest tests/test_prepack.py -q -s     (seconds)
"""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import assert_close
from minidiff.models.clip import TINY_CLIP_VISION, CLIPVisionModel
from minidiff.models.prepack import PackedConv2d, prepack_convs
from minidiff.models.unet import TINY_UNET, UNet
from minidiff.models.vae import TINY_VAE, AutoencoderKL

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

# fp32: the same oneDNN convolutions, but the dense tiny models run NCHW and the packed ones channels-last, so
# layers accumulate in another order; measured max|diff| <= 3.8e-6 of max|y| through the tiny UNet / VAE
# (7.8e-6 abs on the full-size SD-1.5 UNet). 1e-5 relative is fp32 noise over ~30 layers, far below any bug.
TOL_FP32 = 1e-5


def frozen(model):
    torch.manual_seed(0)
    model = model.eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model


def outputs(unet, vae, clip, dtype):
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 4, 17, 13), torch.randn(2, 5, TINY_UNET.context_dim)
    img = torch.rand(1, 3, 40, 24) * 2 - 1
    pixels = torch.randn(1, 3, TINY_CLIP_VISION.image_size, TINY_CLIP_VISION.image_size)
    x, ctx, img, pixels = (t.to(dtype) for t in (x, ctx, img, pixels))
    with torch.inference_mode():
        out = [unet(x, 500, ctx), *vae.encode(img), vae.decode(x[:1]), clip(pixels).hidden_states[-1]]
    return [o.float() for o in out]


NAMES = ["unet", "vae mean", "vae logvar", "vae decode", "clip vision"]


def test_fp32_matches_dense():
    models = [frozen(UNet(TINY_UNET)), frozen(AutoencoderKL(TINY_VAE)), frozen(CLIPVisionModel(TINY_CLIP_VISION))]
    dense = outputs(*models, torch.float32)
    for m in models:  # CLIP: its 14x14 patch conv stays dense, the model must still run
        prepack_convs(m)
    for name, a, b in zip(NAMES, outputs(*models, torch.float32), dense):
        assert_close(a, b, TOL_FP32, f"prepacked {name} fp32")


def test_bf16_no_less_accurate_than_dense_bf16():
    """bf16 rounds every activation to 8 bits, so packed and dense bf16 differ by bf16 noise (measured 1.2% of
    max|y| on the tiny UNet), whatever the layout. The claim tested: against the fp32 result, the packed bf16
    model is as accurate as the dense bf16 one (within 1.5x of its error; measured ratios 0.7-1.1)."""
    fp32 = [frozen(UNet(TINY_UNET)), frozen(AutoencoderKL(TINY_VAE)), frozen(CLIPVisionModel(TINY_CLIP_VISION))]
    exact = outputs(*fp32, torch.float32)
    models = [copy.deepcopy(m).to(torch.bfloat16) for m in fp32]
    dense = outputs(*models, torch.bfloat16)
    for m in models:
        prepack_convs(m)
    packed = outputs(*models, torch.bfloat16)
    for name, p, d, e in zip(NAMES, packed, dense, exact):
        err_p, err_d = (p - e).abs().max().item(), (d - e).abs().max().item()
        print(f"[bf16 {name}] max|packed - fp32| {err_p:.3e}  max|dense - fp32| {err_d:.3e}")
        assert err_p <= 1.5 * err_d + 1e-6, f"{name}: packed bf16 error {err_p:.3e} vs dense {err_d:.3e}"


def test_only_3x3_convs_of_cpu_fp32_bf16_models_are_packed():
    unet = frozen(UNet(TINY_UNET))
    n3 = sum(type(m) is nn.Conv2d and m.kernel_size == (3, 3) for m in unet.modules())
    n1 = sum(type(m) is nn.Conv2d and m.kernel_size != (3, 3) for m in unet.modules())
    prepack_convs(unet)
    assert sum(isinstance(m, PackedConv2d) for m in unet.modules()) == n3 > 0
    assert sum(type(m) is nn.Conv2d for m in unet.modules()) == n1 > 0  # 1x1: plain GEMMs, left as they are
    for dtype in (torch.float16, torch.float64):  # oneDNN packs fp32 and bf16 only: left unchanged
        m = UNet(TINY_UNET).to(dtype)
        before = copy.deepcopy(m.state_dict())
        assert prepack_convs(m) is m and not any(isinstance(c, PackedConv2d) for c in m.modules())
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
