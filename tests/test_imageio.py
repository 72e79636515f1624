"""minidiff.io.imageio: loading awkward image files, the official size rule and the cap, side-by-side.

Every file is made in tmp_path by the test itself (no downloads). Runs in about a second:
    python -m pytest tests/test_imageio.py -q
"""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from minidiff.io.imageio import (ImageError, cap_size, fit_size, list_images, load_image, official_resize,
                              photo_size, side_by_side)


def _png16_rgb(path, arr):
    """Write a 16-bit-per-channel RGB PNG by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter byte 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))


def _rgb(path, **kw):
    notes = []
    im = load_image(path, notes, **kw)
    assert im.mode == "RGB"
    return np.asarray(im), notes


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None].repeat(8, 0)  # [8, 64]
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    arr, notes = _rgb(tmp_path / "g16.png")
    assert arr.shape == (8, 64, 3) and arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255
    assert abs(int(arr[0, 32, 0]) - round(int(ramp[0, 32]) * 255 / 65535)) <= 1 and notes


def test_wide_and_float_modes(tmp_path):
    Image.fromarray(np.full((4, 4), 40000, np.int32)).save(tmp_path / "i32.tif")  # mode I
    assert _rgb(tmp_path / "i32.tif")[0][0, 0, 0] == round(40000 * 255 / 65535)
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")  # mode F, 0..1
    assert _rgb(tmp_path / "f.tif")[0][0, 0, 0] in (127, 128)
    rgb16 = np.zeros((6, 5, 3), np.uint16)
    rgb16[..., 0] = 65535
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    arr, _ = _rgb(tmp_path / "rgb16.png")
    assert arr.shape == (6, 5, 3) and (arr[..., 0] == 255).all() and (arr[..., 1:] == 0).all()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red in CMYK
    arr, notes = _rgb(tmp_path / "cmyk.jpg")
    assert arr[..., 0].min() > 200 and arr[..., 1:].max() < 60 and "CMYK" in notes[0]


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((4, 8, 4), np.uint8)
    rgba[:, :4] = (10, 20, 30, 255)  # left half opaque dark blue, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    arr, notes = _rgb(tmp_path / "rgba.png")
    assert (arr[:, :4] == (10, 20, 30)).all() and (arr[:, 4:] == 255).all() and "white" in notes[0]
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    arr, _ = _rgb(tmp_path / "la.png")
    assert (arr[:, :4] == 10).all() and (arr[:, 4:] == 255).all()
    opaque = np.full((4, 4, 4), 200, np.uint8)
    opaque[..., 3] = 255  # an opaque RGBA file gives the same pixels as the official convert("RGB")
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert (_rgb(tmp_path / "opaque.png")[0] == 200).all()


def test_palette_grey_and_one_pixel(tmp_path):
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert (_rgb(tmp_path / "p.png")[0] == (250, 0, 0)).all()
    p.save(tmp_path / "pt.png", transparency=1)  # index 1 transparent -> white
    assert (_rgb(tmp_path / "pt.png")[0] == 255).all()
    Image.new("L", (1, 1), 77).save(tmp_path / "one.png")
    arr, _ = _rgb(tmp_path / "one.png")
    assert arr.shape == (1, 1, 3) and (arr == 77).all()


def test_exif_rotation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # stored: left red, right blue
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends on top
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out, notes = _rgb(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3) and "orientation 6" in notes[0]
    assert out[5, 10, 0] > 200 and out[35, 10, 2] > 200


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpg", "text", "empty", "missing", "folder"])
def test_bad_files_raise_one_line(tmp_path, kind):
    path = tmp_path / f"bad.{kind.split('_')[-1]}"
    if kind.startswith("truncated"):
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value) and str(path) in str(err.value)


def test_list_images_skips_other_files(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in list_images(tmp_path)] == ["a.JPG", "b.png"]


def test_official_resize_rule():
    def ref(w, h):  # infer.py l.96-107 then VaeImageProcessor's floor to multiples of 8
        im = Image.new("RGB", (w, h), (10, 20, 30))
        if w < 512 or h < 512:
            im = im.resize((512, int(512 / w * h)) if w < h else (int(512 / h * w), 512))
        return (im.width - im.width % 8, im.height - im.height % 8)
    sizes = [(1, 1), (300, 200), (200, 300), (333, 333), (640, 480), (2834, 2091), (511, 700), (97, 999)]
    for w, h in sizes:
        assert official_resize(Image.new("RGB", (w, h))).size == ref(w, h), (w, h)
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    up = im.resize((512, int(512 / 90 * 120)), Image.BICUBIC)
    expect = up.resize((up.width - up.width % 8, up.height - up.height % 8), Image.LANCZOS)
    assert np.array_equal(np.asarray(official_resize(im)), np.asarray(expect))


@pytest.mark.parametrize("size", [(1, 1), (300, 200), (200, 300), (511, 511), (512, 512), (700, 530),
                                  (900, 301), (2834, 2091)])
def test_official_size_matches_official_resize(size):
    from minidiff.io.imageio import official_resize
    assert official_resize(Image.new("RGB", size)).size == photo_size(*size, max_side=0)[0]


def test_fit_size_rule_and_cap():
    assert photo_size(1, 1)[0] == (512, 512) and photo_size(300, 200)[0] == (768, 512)
    assert photo_size(2834, 2091)[0] == (2832, 2088)  # the photo the official code runs out of memory on
    out, note = fit_size(Image.new("RGB", (2834, 2091)), max_side=1536)
    assert out.size == (1536, 1128) and "capped" in note
    out, note = fit_size(Image.new("RGB", (100, 2000)), max_side=1536)  # official rule would give 512x10240
    assert max(out.size) <= 1536 and out.size[0] % 8 == 0 and "capped" in note
    assert out.size == (72, 1536)  # upscaled 1.3x (BICUBIC), not stretched to 512 wide
    out, note = fit_size(Image.new("RGB", (3000, 1)), max_side=1536)
    assert out.size == (1536, 8)
    assert cap_size(Image.new("RGB", (600, 400)), 1536)[1] is None
    out, note = cap_size(Image.new("RGB", (3001, 2000)), 1536)
    assert out.size == (1536, 1024) and "1536" in note


def test_side_by_side():
    a = Image.new("RGB", (10, 20), (255, 0, 0))
    b = Image.new("RGB", (16, 32), (0, 255, 0))
    out = np.asarray(side_by_side(a, b))
    assert out.shape == (32, 32, 3)
    assert (out[:, :16] == (255, 0, 0)).all() and (out[:, 16:] == (0, 255, 0)).all()
