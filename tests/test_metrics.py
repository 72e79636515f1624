"""Tests of minidiff/eval/metrics.py: FID/KID statistics, saved statistics, clean-fid's CLIP preprocessing.

Fast: closed-form FID vs scipy sqrtm, KID properties, .npz round trip and feature-type checks.
Parity (oracle environment with clean-fid + pytorch-fid; MINIDIFF_ORACLE_PYTHON):
FID/KID equal clean-fid's frechet_distance / kernel_distance and pytorch-fid's calculate_frechet_distance.
Run: MINIDIFF_ORACLE_PYTHON=/work/venvs/oracle/bin/python python -m pytest tests/test_metrics.py -q -s
"""
import json
import os

import numpy as np
import pytest
from scipy import linalg

from minidiff.eval import metrics
from helpers import run_oracle

ORACLE = os.path.join(os.path.dirname(__file__), "oracle")


def feature_pairs():
    """(a, b) feature sets: n > d, n < d (singular covariances: the eps retry path), KID subset < n."""
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(60, 16)), rng.normal(0.3, 1.2, size=(50, 16))),
            (rng.normal(size=(10, 32)), rng.normal(0.1, 1.0, size=(12, 32))),
            (rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) ** 2)]


def test_fid_matches_closed_form_sqrtm():
    a, b = feature_pairs()[0]
    mu1, s1 = metrics.statistics(a)
    mu2, s2 = metrics.statistics(b)
    assert np.allclose(mu1, a.mean(0)) and np.allclose(s1, np.cov(a.T))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert abs(metrics.frechet_distance(mu1, s1, mu2, s2) - expected) <= 1e-10 * expected
    # FID of a set against itself is ~0, and symmetric
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    assert np.isclose(metrics.frechet_distance(mu1, s1, mu2, s2), metrics.frechet_distance(mu2, s2, mu1, s1))
    # 1-d Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2
    assert np.isclose(metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0)


def test_fid_singular_covariances_finite():
    a, b = feature_pairs()[1]
    assert np.isfinite(metrics.frechet_distance(*metrics.statistics(a), *metrics.statistics(b)))


def test_kid_properties():
    a, b = feature_pairs()[0]
    assert metrics.kernel_distance(a, b, seed=1) == metrics.kernel_distance(a, b, seed=1)
    # two halves of one distribution: near 0 next to a shifted distribution
    same = abs(metrics.kernel_distance(a[:30], a[30:]))
    assert same < 0.1 * metrics.kernel_distance(a, b) < metrics.kernel_distance(a, b + 2.0)
    # exactly m images in both sets: subsets are permutations, so the seed does not matter
    c, d = feature_pairs()[2]
    assert np.isclose(metrics.kernel_distance(c, d, seed=0), metrics.kernel_distance(c, d, seed=5))
    assert metrics.kid_subset_size(5000, 3000) == 1000 and metrics.kid_subset_size(40, 30) == 30
    with pytest.raises(metrics.MetricsError):
        metrics.kernel_distance(a[:1], b)


def test_stats_roundtrip_and_type_check(tmp_path):
    a, _ = feature_pairs()[0]
    path = str(tmp_path / "ref.npz")
    metrics.save_stats(path, a.astype(np.float32), "inception", weights_sha256="abc")
    assert os.listdir(tmp_path) == ["ref.npz"]  # temp file renamed, no ".npz.npz"
    st = metrics.load_stats(path, "inception")
    mu, sigma = metrics.statistics(a.astype(np.float32))
    assert st["feature_type"] == "inception" and st["count"] == 60
    assert np.array_equal(st["mu"], mu) and np.array_equal(st["sigma"], sigma)
    assert st["feats"].shape == (60, 16)
    with pytest.raises(metrics.MetricsError, match="inception features, but clip_vit_b_32"):
        metrics.load_stats(path, "clip_vit_b_32")
    # a clean-fid stats file (mu, sigma only): the type comes from the dimension
    np.savez(tmp_path / "cf.npz", mu=np.zeros(512, np.float32), sigma=np.eye(512))
    st = metrics.load_stats(str(tmp_path / "cf.npz"), "clip_vit_b_32")
    assert st["feats"] is None and st["feature_type"] == "clip_vit_b_32"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(metrics.MetricsError, match="not a readable"):
        metrics.load_stats(str(tmp_path / "bad.npz"))


def test_folder_listing_as_cleanfid(tmp_path):
    from PIL import Image
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "sub/a.jpg", "c.PNG", "d.Png"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("x")
    files = [os.path.relpath(f, tmp_path) for f in metrics.list_images(str(tmp_path))]
    assert files == sorted(["b.png", "sub/a.jpg", "c.PNG"])  # case-sensitive extensions, as clean-fid's
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(metrics.MetricsError, match="broken.png: cannot read image"):
        metrics.read_image(str(tmp_path / "broken.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(metrics.MetricsError, match="no image files"):
        metrics.list_images(str(tmp_path / "empty"))


def test_clip_resize_geometry():
    # short side -> 224 with truncated long side, then a centred crop with round-half-even offsets
    arr = np.random.default_rng(0).integers(0, 256, size=(301, 451, 3), dtype=np.uint8)
    assert metrics.clip_resize(arr).shape == (224, 224, 3)
    sq = np.random.default_rng(1).integers(0, 256, size=(224, 227, 3), dtype=np.uint8)
    assert np.array_equal(metrics.clip_resize(sq), sq[:, 2:226])  # no resample; left = round(1.5) = 2
    x = metrics.clip_pixels(arr)
    assert x.shape == (3, 224, 224) and x.dtype.is_floating_point


@pytest.mark.parity
def test_fid_kid_equal_cleanfid_and_pytorch_fid(tmp_path):
    pairs = feature_pairs()
    np.savez(tmp_path / "feats.npz", **{f"{k}{i}": v for i, p in enumerate(pairs) for k, v in zip("ab", p)})
    run_oracle(os.path.join(ORACLE, "fid_stats.py"), tmp_path / "feats.npz", tmp_path / "out.json")
    ref = json.load(open(tmp_path / "out.json"))
    for i, ((a, b), r) in enumerate(zip(pairs, ref)):
        fid = metrics.frechet_distance(*metrics.statistics(a), *metrics.statistics(b))
        kid = metrics.kernel_distance(a, b, seed=i)  # same legacy MT19937 stream as np.random.seed(i)
        rel = max(abs(fid - r[k]) / abs(r[k]) for k in r if k != "cleanfid_kid")
        print(f"pair {i}: fid {fid:.10g} (clean-fid {r['cleanfid_fid']:.10g}, pytorch-fid "
              f"{r['pytorch_fid']:.10g})  kid {kid:.10g} (clean-fid {r['cleanfid_kid']:.10g})  "
              f"max rel diff {rel:.2e} / {abs(kid / r['cleanfid_kid'] - 1):.2e}")
        # 1e-6 relative: the same float64 algorithm on the same arrays (the bound)
        for key in ("cleanfid_fid", "cleanfid_fid_from_feats", "pytorch_fid"):
            assert abs(fid - r[key]) <= 1e-6 * abs(r[key]), key
        assert abs(kid - r["cleanfid_kid"]) <= 1e-6 * abs(r["cleanfid_kid"])


def test_clip_weights_must_be_b32(tmp_path):
    import torch
    from safetensors.torch import save_file
    from minidiff.models.clip import TINY_CLIP_VISION_B32, CLIPVisionModel
    torch.manual_seed(0)
    save_file(CLIPVisionModel(TINY_CLIP_VISION_B32).state_dict(), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(metrics.MetricsError, match="not a CLIP ViT-B/32 vision tower"):
        metrics.load_feature_extractor("clip_vit_b_32", str(tmp_path / "tiny.safetensors"))
