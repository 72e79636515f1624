"""Tests for the tiled VAE encode/decode of minidiff/models/vae.py (vae.tiled, vae.blend, AutoencoderKL's switch).

Fast: below the size switch the result is bit-identical to the whole-image pass (and the switch is exact);
tiled shapes on sizes that do not divide into tiles; the blend's weights.
Parity (@pytest.mark.parity, needs diffusers): tiled encode (mean, logvar) and decode against diffusers'
AutoencoderKL with enable_tiling() on the same weights (tiny config, small tiles, so many tiles and ragged
edges), the algorithm minidiff reproduces.
Slow (full-size SD-1.5 VAE, random weights): tiled against untiled on a photo where both fit: difference
bounded, and no seams: the difference along the tile borders is no bigger than inside the tiles.
Run: cd /work/main && python -m pytest tests/test_vae_tiling.py -q -s --runslow    (one thread: the fast and
parity tests ~6 s, diffusers' import included; the slow full-size test ~1 min)
"""
import pytest
import torch

from helpers import assert_close
from test_vae import diffusers_vae, original_file
from minidiff.io.loading import build_vae
from minidiff.models.vae import TILE, TILE_ABOVE, TILE_OVERLAP, TINY_VAE, AutoencoderKL, VAEConfig, blend
from minidiff.io.weights import read_state_dict

WHOLE = 10**12  # vae.tile_above: never tile


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(TINY_VAE).eval()  # 2 levels: latents are 1/2 of the image


def smooth_image(h, w, seed=0):
    """[1, 3, h, w] in [-1, 1]: bicubic-upscaled noise, a photo-like image without pixel noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_switch_is_exact_and_small_sizes_are_untouched():
    vae = tiny_vae()
    vae.tile = 16
    x = smooth_image(24, 40)
    with torch.no_grad():
        vae.tile_above = WHOLE
        mean, logvar = vae.encode(x)
        image = vae.decode(mean)
        vae.tile_above = 24 * 40  # exactly the image's pixels: still one whole pass, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(vae.encode(x), (mean, logvar)))
        assert torch.equal(vae.decode(mean), image)  # latents of a 24x40 image: the same switch
        vae.tile_above = 24 * 40 - 1  # one pixel fewer: tiles
        assert not torch.equal(vae.encode(x)[0], mean) and not torch.equal(vae.decode(mean), image)
    # the defaults: SD-1.5's 512 tiles, and every size the official demo makes (up to 1536x1024) untiled
    assert (TILE, TILE_OVERLAP) == (512, 0.25) and TILE_ABOVE >= 1536 * 1024
    assert vae.scale == 2 and len(VAEConfig().ch_mult) == 4  # SD: 8


@pytest.mark.parametrize("h, w", [(40, 40), (52, 42), (16, 90)])
def test_tiled_shapes_and_inputs_unmutated(h, w):
    vae = tiny_vae()
    vae.tile, vae.tile_above = 16, 0  # always tiles; 16 px tiles every 12 px, ragged last tiles
    x = smooth_image(h, w)
    x0 = x.clone()
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        z = mean.clone()
        image = vae.decode(z)
    assert mean.shape == logvar.shape == (1, 4, h // 2, w // 2)
    assert image.shape == (1, 3, h // 2 * 2, w // 2 * 2)
    assert torch.equal(x, x0) and torch.equal(z, mean), "tiled encode/decode modified an input"
    assert torch.isfinite(image).all()


def test_blend_weights():
    a, b = torch.zeros(1, 1, 4, 8), torch.ones(1, 1, 4, 8)
    out = blend(a, b, 4, dim=3)  # columns 0..3 of b fade in from a's last 4: weights 0, 1/4, 2/4, 3/4
    assert out is b and torch.equal(b[0, 0, 0], torch.tensor([0, 0.25, 0.5, 0.75, 1, 1, 1, 1]))
    b = torch.ones(1, 1, 2, 3)
    blend(torch.zeros(1, 1, 6, 3), b, 4, dim=2)  # extent clipped to the smaller tile: 2 rows, weights 0, 1/2
    assert torch.equal(b[0, 0, :, 0], torch.tensor([0, 0.5]))


@pytest.mark.parity
@pytest.mark.parametrize("h, w", [(88, 72), (64, 100)])
def test_parity_with_diffusers_tiling(tmp_path, h, w):
    """Tiny config, 32 px tiles (16 latent cells, diffusers' tile_sample/latent_min_size): every tile, blend
    and crop as diffusers' _tiled_encode / tiled_decode."""
    pytest.importorskip("diffusers")
    ref = diffusers_vae((32, 64), 1, seed=3)
    vae = build_vae(read_state_dict(str(original_file(ref, tmp_path)), "first_stage_model."))
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 32, 16
    vae.tile, vae.tile_above = 32, 0
    x = smooth_image(h, w, seed=1)
    z = torch.randn(1, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, logvar = vae.encode(x)
        assert_close(mean, post.mean, 1e-4, "tiled mean")  # fp32 reordering only, as tests/test_vae.py
        assert_close(logvar, post.logvar, 1e-4, "tiled logvar")
        assert_close(vae.decode(z), ref.decode(z).sample, 1e-4, "tiled decode")


def seam_ratio(image, stride, extent, period=2):
    """Mean |step| between neighbouring columns and rows ON the tile borders (where a tile's kept part starts,
    and where its blend ends) over the mean step at the other columns/rows at multiples of `period` (the
    decoder's nearest upsamplings make steps differ with the position modulo 2 (tiny) or 8 (SD)): ~1 without
    seams."""
    ratios = []
    for dim in (3, 2):  # columns, then rows
        n = image.shape[dim]
        step = (image.narrow(dim, 1, n - 1) - image.narrow(dim, 0, n - 1)).abs()
        step = step.mean(dim=[d for d in range(4) if d != dim])  # [n-1]: step[c - 1] is between c - 1 and c
        borders = [c for j in range(1, n // stride + 1) for c in (j * stride, j * stride + extent) if c < n]
        inside = [c for c in range(period, n, period) if c not in borders]
        ratios.append(step[[c - 1 for c in borders]].mean() / step[[c - 1 for c in inside]].mean())
    return float(sum(ratios) / 2)


def test_no_seams_on_tile_borders_and_bounded_difference(monkeypatch):
    """Steps across the tile borders of a tiled decode are about those inside the tiles, and the test sees a
    seam: the same tiles cut without blending fail it. Measured (seed 1, 128 px, 32 px tiles): untiled 0.85,
    tiled 1.12, unblended 1.41."""
    import minidiff.models.vae as vae_module
    vae = tiny_vae(seed=1)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))  # no bias exactly 0, as test_vae.diffusers_vae
        mean, _ = vae.encode(smooth_image(128, 128, seed=1))
        vae.tile = 32  # 16 latent cells, every 12: output tiles start every 24 px, blended over 8
        untiled = vae.decode(mean)
        ratio = {"untiled": seam_ratio(untiled, 24, 8)}
        vae.tile_above = 0
        tiled = vae.decode(mean)
        ratio["tiled"] = seam_ratio(tiled, 24, 8)
        monkeypatch.setattr(vae_module, "blend", lambda a, b, extent, dim: b)
        ratio["unblended"] = seam_ratio(vae.decode(mean), 24, 8)
    assert ratio["untiled"] < 1.25 and ratio["tiled"] < 1.25 < ratio["unblended"], ratio


@pytest.mark.slow  # a full-size network: --runslow (CI runs it); ~1 min on one thread
def test_full_size_tiled_against_untiled():
    """SD-1.5-size VAE (random weights), a 320x320 photo in 256 px tiles (2 x 2, every 192 px) against one
    whole pass: difference bounded, no seams on the tile borders."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig()).eval()
    x = smooth_image(320, 320)
    with torch.no_grad():
        mean, _ = vae.encode(x)
        untiled = vae.decode(mean)
        vae.tile, vae.tile_above = 256, 0
        tiled_mean, _ = vae.encode(x)
        tiled = vae.decode(mean)
    rel = {"latent": float((tiled_mean - mean).abs().mean() / mean.abs().mean()),
           "image": float((tiled - untiled).abs().mean() / untiled.abs().mean())}
    ratio = seam_ratio(tiled, 192, 64, period=8), seam_ratio(untiled, 192, 64, period=8)
    print(f"mean |tiled - untiled| / mean |untiled|: {rel}; seam ratio tiled {ratio[0]:.3f}, "
          f"untiled {ratio[1]:.3f}")
    # Each tile normalises (GroupNorm) and attends over itself alone, which moves every pixel a little: with
    # random weights measured 0.10 (latent) and 0.24 (image); a misplaced tile or a broken blend gives ~1.
    # Seam ratios measured: tiled 0.78, untiled 0.72 (no step along the borders).
    assert rel["latent"] < 0.15 and rel["image"] < 0.35, rel
    assert ratio[0] < 1.25, ratio
