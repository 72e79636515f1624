"""Tests for minidiff.models.clip.clip_preprocess (CLIP's image preprocessing).

Fast: shapes and dtype for single images, lists and non-RGB modes; inputs left untouched.
Parity (@pytest.mark.parity, needs transformers 4.x): against transformers' CLIPImageProcessor (the PIL/numpy
one of 4.x, the class Diff-Plugin's official code calls) on real photos (helpers.photo_folder(): the official
demo photos, else examples/) and on synthetic sizes: smaller than 224, 1-pixel and
3-pixel sides, odd crops, long strips, and grey / RGBA / palette / CMYK images. Expected: bit-exact (the same
PIL resize, then the same float32 arithmetic).
Run: cd /work/main && python -m pytest tests/test_clip_preprocess.py -q -s     (about 10 s on 2 CPU cores)
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_close, photo_folder
from minidiff.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

DEMO = photo_folder()
# (width, height): exact 224, one over (odd crop), smaller than 224, tiny, thin strips, 1 and 3 pixels high
SIZES = [(224, 224), (225, 224), (500, 223), (7, 300), (1, 1), (300, 3), (3, 300), (1, 60), (640, 427),
         (223, 225), (1000, 999), (31, 17)]


def random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + 7 * w + h)
    # smooth + noise, so that the bicubic filter sees structure, not only noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx[..., None] / 9.0 + np.arange(3)) * np.cos(yy[..., None] / 13.0)
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_shapes_modes_and_untouched_input():
    images = [random_image(w, h, mode) for (w, h), mode in zip(SIZES, ["RGB", "L", "RGBA", "P", "CMYK"] * 3)]
    before = [np.asarray(im).copy() for im in images]
    x = clip_preprocess(images)
    assert x.shape == (len(SIZES), 3, 224, 224) and x.dtype == torch.float32
    assert all(np.array_equal(np.asarray(im), b) for im, b in zip(images, before))
    assert clip_preprocess(images[0]).shape == (1, 3, 224, 224)
    # a uniform grey image normalises to (grey/255 - mean)/std exactly
    grey = clip_preprocess(Image.new("RGB", (50, 80), (128, 128, 128)))
    expected = (torch.tensor(128 / 255) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(grey[0, :, 100, 100], expected)
    with pytest.raises(ValueError):
        clip_preprocess([])


def transformers_reference(image, processor):
    """CLIPImageProcessor's pixels. For images 1 or 3 pixels high transformers guesses the channel axis
    wrongly (a (1, W, 3) or (3, W, 3) array looks channels-first); the layout is then stated explicitly."""
    kwargs = {"input_data_format": "channels_last"} if image.height in (1, 3) else {}
    return torch.from_numpy(processor(image, return_tensors="np", **kwargs)["pixel_values"])


@pytest.mark.parity
def test_matches_clip_image_processor_on_synthetic_sizes_and_modes():
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessor()
    cases = [(size, "RGB") for size in SIZES] + [(size, mode) for mode in ("L", "RGBA", "P", "CMYK")
                                                  for size in ((500, 223), (3, 300))]
    for (w, h), mode in cases:
        image = random_image(w, h, mode)
        # bit-exact expected: identical PIL resize, identical float32 operations; 1e-6 absolute as the bound
        assert_close(clip_preprocess(image), transformers_reference(image, processor), 1e-6,
                     f"preprocess {mode} {w}x{h}", scale=False)


@pytest.mark.parity
def test_matches_clip_image_processor_on_demo_photos():
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessor()
    names = sorted(n for n in os.listdir(DEMO) if n.endswith((".jpg", ".png")))
    assert names
    images = [Image.open(os.path.join(DEMO, n)) for n in names]  # opened as the official code's PIL does
    x = clip_preprocess(images)
    for image, name, row in zip(images, names, x):
        print(f"{name}: {image.size} {image.mode}")
        expected = transformers_reference(image, processor)
        assert_close(row[None], expected, 1e-6, f"preprocess {name}", scale=False)
