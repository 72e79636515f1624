"""Tests for minidiff/train/degrade.py: seeded determinism, valid images for all eight tasks at odd sizes, the
official face pipeline's parameter ranges and kernels, the OpenCV stand-ins' rules, the direction each
degradation moves a photo, and the unknown-task error. CPU, no files, a few seconds:

    OMP_NUM_THREADS=1 python -m pytest tests/test_degrade.py -q
"""
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from minidiff.train.degrade import (DEGRADATIONS, bivariate_gaussian, degrade, face_params, filter2d, jpeg,
                              resize_linear)
from minidiff.plugin.plugin import TASKS


def photo(h=96, w=96, texture=0.0):
    """A colour ramp, plus a 4-px checkerboard of the given contrast: a stand-in photo, as PIL RGB."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.3 + 0.4 * x, 0.2 + 0.5 * y, 0.6 - 0.3 * x * y], -1)  # [H, W, 3]
    checker = ((np.arange(h)[:, None] // 4 + np.arange(w)[None] // 4) % 2 - 0.5)[..., None]  # [H, W, 1]
    return Image.fromarray((np.clip(base + texture * checker, 0, 1) * 255).round().astype(np.uint8))


def arr(image):
    return np.asarray(image, np.float64) / 255


def grad_energy(image):
    """Mean squared difference of neighbouring pixels: high-frequency energy."""
    a = arr(image)
    return np.mean(np.diff(a, axis=0) ** 2) + np.mean(np.diff(a, axis=1) ** 2)


def test_tasks_match_the_plugins():
    assert set(DEGRADATIONS) == set(TASKS)


@pytest.mark.parametrize("task", sorted(DEGRADATIONS))
def test_deterministic_per_seed(task):
    image = photo(texture=0.3)
    before = np.asarray(image).copy()
    a, b = degrade(task, image, 3), degrade(task, image, 3)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != degrade(task, image, 4).tobytes()
    assert degrade(task, image, (1, 2, 3)).tobytes() == degrade(task, image, (1, 2, 3)).tobytes()
    np.testing.assert_array_equal(np.asarray(image), before)  # the input is left alone


@pytest.mark.parametrize("task", sorted(DEGRADATIONS))
@pytest.mark.parametrize("size", [(37, 53), (53, 37), (7, 5)])
def test_valid_image_any_size(task, size):
    out = degrade(task, photo(size[1], size[0], texture=0.3), 0)
    assert out.mode == "RGB" and out.size == size
    assert np.asarray(out).dtype == np.uint8 and np.asarray(out).shape == (size[1], size[0], 3)


def test_face_parameter_ranges():
    rng = np.random.default_rng(0)
    draws = [face_params(rng) for _ in range(2000)]
    iso = [p for p in draws if p["kernel_type"] == "iso"]
    assert 0.45 < len(iso) / len(draws) < 0.55 and {p["kernel_type"] for p in draws} == {"iso", "aniso"}
    for p in draws:
        k = p["kernel"]
        assert k.shape == (41, 41) and abs(k.sum() - 1) < 1e-12 and k.min() >= 0
        np.testing.assert_allclose(k, k[::-1, ::-1], rtol=1e-12, atol=0)  # a Gaussian is point-symmetric
        assert 0.1 <= p["sigma_x"] < 10 and 0.1 <= p["sigma_y"] < 10 and -math.pi <= p["theta"] < math.pi
        assert 0.8 <= p["scale"] < 8 and 0 <= p["noise_sigma"] < 20
        assert isinstance(p["quality"], int) and 60 <= p["quality"] <= 99
    for p in iso:  # BasicSR: an isotropic kernel has sigma_y = sigma_x and no rotation
        assert p["sigma_y"] == p["sigma_x"] and p["theta"] == 0.0
    # the draws fill the official ranges
    assert min(p["sigma_x"] for p in draws) < 0.2 and max(p["sigma_x"] for p in draws) > 9.9
    assert min(p["scale"] for p in draws) < 0.85 and max(p["scale"] for p in draws) > 7.9
    assert {p["quality"] for p in draws} == set(range(60, 100))
    assert max(abs(p["theta"]) for p in draws) > 3.1


def test_bivariate_gaussian_closed_form():
    ax = np.arange(-20, 21.0)
    gy, gx = np.exp(-ax ** 2 / (2 * 3.0 ** 2)), np.exp(-ax ** 2 / (2 * 1.5 ** 2))
    separable = np.outer(gy, gx) / np.outer(gy, gx).sum()  # rows: sigma_y 3, columns: sigma_x 1.5
    np.testing.assert_allclose(bivariate_gaussian(41, 1.5, 3.0, 0.0), separable, rtol=1e-10, atol=1e-15)
    # a quarter turn swaps the axes
    turned = bivariate_gaussian(41, 1.5, 3.0, math.pi / 2)
    np.testing.assert_allclose(turned, bivariate_gaussian(41, 3.0, 1.5, 0), rtol=1e-9, atol=1e-15)


def test_filter2d_is_opencv_correlation_with_reflect101():
    kernel = np.zeros((3, 3))
    kernel[1, 0] = 1.0  # out[y, x] = img[y, x - 1] (correlation: no flip)
    img = np.arange(20, dtype=np.float32).reshape(4, 5, 1)
    out = filter2d(img, kernel)[..., 0]
    np.testing.assert_allclose(out[:, 1:], img[:, :-1, 0], atol=1e-5)
    np.testing.assert_allclose(out[:, 0], img[:, 1, 0], atol=1e-5)  # BORDER_REFLECT_101: x = -1 reads x = 1
    impulse = np.zeros((41, 41, 1), np.float32)
    impulse[20, 20] = 1
    k = bivariate_gaussian(41, 1.0, 4.0, 0.7)
    np.testing.assert_allclose(filter2d(impulse, k)[..., 0], k[::-1, ::-1], atol=1e-7)


def test_resize_linear_is_opencv_inter_linear():
    up = resize_linear(np.array([[[0.0], [1.0]]], np.float32), 4, 1)[0, :, 0]
    np.testing.assert_allclose(up, [0, 0.25, 0.75, 1], atol=1e-7)  # half-pixel centres, edges clamped
    # a 3x shrink reads pixels 1, 4, 7 (no antialiasing: PIL's bilinear would average 0/1 to about 1/3, 2/3)
    alternate = (np.arange(9) % 2).astype(np.float32)[None, :, None]
    np.testing.assert_array_equal(resize_linear(alternate, 3, 1)[0, :, 0], [1, 0, 1])


def test_jpeg_is_close_and_deterministic():
    img = arr(photo()).astype(np.float32)
    a, b = jpeg(img, 95), jpeg(img, 95)
    assert a.dtype == np.float32 and a.shape == img.shape and np.array_equal(a, b)
    assert np.abs(a - img).mean() < 2 / 255 < np.abs(jpeg(img, 60) - img).mean() + 2 / 255


def dark_channel(image):
    return ndimage.minimum_filter(arr(image).min(-1), size=7).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_degradation_moves_the_photo_the_expected_way(seed):
    smooth, textured = photo(), photo(texture=0.3)
    assert arr(degrade("lowlight", textured, seed)).mean() < 0.6 * arr(textured).mean()
    assert dark_channel(degrade("dehaze", smooth, seed)) > dark_channel(smooth) + 0.05
    assert grad_energy(degrade("deblur", textured, seed)) < 0.8 * grad_energy(textured)
    for task in ("derain", "desnow", "demoire"):  # streaks, flakes and bands add high frequencies
        assert grad_energy(degrade(task, smooth, seed)) > 2 * grad_energy(smooth), task
    for task in ("derain", "highlight"):  # both only add light
        assert (np.asarray(degrade(task, smooth, seed)) >= np.asarray(smooth)).all(), task
    saturated = (np.asarray(degrade("highlight", smooth, seed)) >= 250).all(-1).mean()
    assert saturated > (np.asarray(smooth) >= 250).all(-1).mean()


def test_face_loses_detail_when_it_downscales():
    textured = photo(texture=0.3)
    seeds = [s for s in range(12) if face_params(np.random.default_rng(s))["scale"] >= 2]
    assert len(seeds) >= 4  # degrade() draws face_params first from default_rng(seed)
    for s in seeds:
        assert grad_energy(degrade("face", textured, s)) < 0.5 * grad_energy(textured)


def test_unknown_task():
    with pytest.raises(ValueError, match="known tasks: derain, desnow, lowlight") as e:
        degrade("derainn", photo(), 0)
    assert "\n" not in str(e.value) and "'derainn'" in str(e.value)
