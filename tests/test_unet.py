"""Tests for minidiff/models/unet.py (the SD-1.x UNet) and its diffusers parity.

Fast: shapes (odd latent sizes too), timestep forms, skip_residuals (zeros change nothing, one residual
changes the output, bad index refused), inputs left unmutated, SD-1.5 size and key count on the meta device.
Parity (@pytest.mark.parity, needs diffusers 0.35.2): random diffusers UNet2DConditionModel weights written in
the ORIGINAL single-file layout by tests/sd_layout.py, which is proved by a round trip through diffusers' own
single-file converter; then eps vs diffusers at full SD-1.5 size (1x4x16x16) and tiny size (incl. 17x13), and
Diff-Plugin's SCB residual path (12-entry list + zero mid residual, official-facts 1.9).
Run: cd /work/main && python -m pytest tests/test_unet.py -q -s     (seconds; the full-size parity test is
marked slow: add --runslow, about 25 s more on 2 CPU cores)
"""
import gc

import pytest
import torch

import sd_layout
from helpers import assert_close
from minidiff.models.unet import TINY_UNET, UNet, UNetConfig
from minidiff.io.loading import build_unet
from minidiff.models.prepack import prepack_convs

# fp32 throughout; the two implementations differ only in summation order (SDPA vs SDPA, conv vs conv), so
# 1e-4 x max(1, max|ref|) (the bound) leaves room for ~1e-6 relative noise through ~30 layers.
TOL = 1e-4


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(TINY_UNET).eval()


def test_shapes_odd_sizes_and_timestep_forms():
    unet = tiny_unet()
    ctx = torch.randn(2, 5, TINY_UNET.context_dim)
    for h, w in [(16, 16), (17, 13), (9, 24)]:
        x = torch.randn(2, 4, h, w)
        with torch.no_grad():
            eps = unet(x, 500, ctx)
            assert eps.shape == (2, 4, h, w)
            assert torch.equal(eps, unet(x, torch.tensor(500), ctx))  # 0-d tensor = int
            assert torch.equal(eps, unet(x, torch.tensor([500, 500]), ctx))  # [B] tensor
            assert not torch.equal(eps, unet(x, torch.tensor([500, 20]), ctx))


def test_skip_residuals_and_inputs_unmutated():
    unet = tiny_unet()
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 7, TINY_UNET.context_dim)
    res = {0: torch.randn(1, 32, 16, 16), 1: torch.randn(1, 32, 16, 16), 2: torch.randn(1, 32, 16, 16)}
    copies = [x.clone(), ctx.clone()] + [r.clone() for r in res.values()]
    with torch.no_grad():
        base = unet(x, 10, ctx)
        assert torch.equal(base, unet(x, 10, ctx, skip_residuals={i: torch.zeros(1) for i in range(12)}))
        with_res = unet(x, 10, ctx, skip_residuals=res)
        only0 = unet(x, 10, ctx, skip_residuals={0: res[0]})
    assert (with_res - base).abs().max() > 1e-3 and (only0 - base).abs().max() > 1e-3
    for a, b in zip([x, ctx, *res.values()], copies):
        assert torch.equal(a, b), "an input was modified in place"
    with pytest.raises(ValueError, match="no skip connection 12"):
        unet(x, 10, ctx, skip_residuals={12: torch.zeros(1)})


def test_sd15_size_and_keys_on_meta():
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    # 859,520,964 parameters and 686 tensors: the model.diffusion_model.* part of v1-5-pruned-emaonly
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    sd = unet.state_dict()
    assert len(sd) == 686
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    # an Upsample without attention sits in slot 1, after a SpatialTransformer in slot 2
    assert sd["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert "input_blocks.3.0.op.weight" in sd and "out.2.bias" in sd and "time_embed.2.weight" in sd


# ----------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------------------
def diffusers_unet(seed=0, meta=False, **kw):
    """A diffusers SD-1.x-style UNet2DConditionModel; random weights, every tensor perturbed (no exact
    0/1)."""
    diffusers = pytest.importorskip("diffusers")
    kw = {"cross_attention_dim": 768, "attention_head_dim": 8, **kw}
    if meta:
        from accelerate import init_empty_weights
        with init_empty_weights():
            return diffusers.UNet2DConditionModel(**kw)
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model


TINY_DIFFUSERS = {"block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32}  # = TINY_UNET


def load_original(dunet):
    """The diffusers UNet written in the original layout (test-side mapping), loaded by minidiff's loader."""
    osd = sd_layout.unet_to_original(dunet.state_dict(), dunet.config.layers_per_block)
    return build_unet({k: v.detach() for k, v in osd.items()})


@pytest.mark.parity
@pytest.mark.parametrize("kw", [{}, TINY_DIFFUSERS], ids=["sd15", "tiny"])
def test_original_layout_round_trip_through_diffusers(kw):
    """sd_layout's diffusers->original mapping, undone by diffusers' own single-file converter: every tensor
    comes back under its diffusers name, the very same object (meta tensors: costs no memory)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    dunet = diffusers_unet(meta=True, **kw)
    dsd = dunet.state_dict()
    osd = sd_layout.unet_to_original(dsd, dunet.config.layers_per_block)
    back = convert_ldm_unet_checkpoint({sd_layout.UNET_PREFIX + k: v for k, v in osd.items()},
                                       dict(dunet.config))
    assert set(back) == set(dsd) and all(back[k] is dsd[k] for k in dsd)
    print(f"[round trip {'sd15' if not kw else 'tiny'}] {len(dsd)} tensors identical")


@pytest.mark.parity
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "prepacked"])
@pytest.mark.parametrize("hw", [(16, 16), (17, 13)])
def test_eps_parity_tiny(hw, packed):
    dunet = diffusers_unet(**TINY_DIFFUSERS)
    unet = load_original(dunet)
    if packed:  # CPU inference: 3x3 kernels packed once for oneDNN (minidiff/models/prepack.py)
        prepack_convs(unet)
    torch.manual_seed(1)
    x, ctx, t = torch.randn(2, 4, *hw), torch.randn(2, 6, 32), torch.tensor([981, 1])
    with torch.no_grad():
        ref = dunet(x, t, encoder_hidden_states=ctx).sample
        eps = unet(x, t, ctx)
    assert_close(eps, ref, TOL, f"UNet eps tiny {hw}")


@pytest.mark.parity
def test_skip_residuals_parity_tiny():
    """Diff-Plugin's SCB call: 3 real residuals on skips 0, 1, 2; diffusers needs the 12-entry list (9
    broadcast zeros) AND a zero mid residual, else it takes its T2I-Adapter path (official-facts 1.9)."""
    dunet = diffusers_unet(**TINY_DIFFUSERS)
    unet = load_original(dunet)
    torch.manual_seed(2)
    x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 6, 32), torch.tensor(999)
    res = [torch.randn(1, 32, 16, 16) for _ in range(3)]
    with torch.no_grad():
        ref = dunet(x, t, encoder_hidden_states=ctx,
                    down_block_additional_residuals=res + [torch.zeros(1)] * 9,
                    mid_block_additional_residual=torch.zeros(1)).sample
        plain = dunet(x, t, encoder_hidden_states=ctx).sample
        eps = unet(x, t, ctx, skip_residuals=dict(enumerate(res)))
    assert (ref - plain).abs().max() > 1e-2  # the residuals matter
    assert_close(eps, ref, TOL, "UNet eps tiny + SCB residuals")


@pytest.mark.slow  # a full-size network: --runslow (CI runs it)
@pytest.mark.parity
def test_eps_parity_sd15_full_size():
    """Full SD-1.5 size (860M parameters, 3.4 GB fp32): one copy of the weights at a time. The reference runs
    first; the converted dict then shares diffusers' tensors, so minidiff's UNet reuses that memory."""
    dunet = diffusers_unet()
    torch.manual_seed(3)
    x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 768), torch.tensor([500])
    with torch.no_grad():
        ref = dunet(x, t, encoder_hidden_states=ctx).sample
    osd = sd_layout.unet_to_original(dunet.state_dict(), dunet.config.layers_per_block)
    del dunet
    gc.collect()
    unet = build_unet({k: v.detach() for k, v in osd.items()})
    del osd
    with torch.no_grad():
        eps = unet(x, t, ctx)
        eps_packed = prepack_convs(unet)(x, t, ctx)
    assert_close(eps, ref, TOL, "UNet eps SD-1.5 full size 16x16")
    assert_close(eps_packed, ref, TOL, "UNet eps SD-1.5 full size 16x16, prepacked convs")
