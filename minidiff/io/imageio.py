"""Images in and out, and every image rule in one place: robust loading, the official size rule, the size
cap, PIL <-> tensor, side-by-side comparisons, atomic PNG writes.

Loading mirrors the official Diff-Plugin code (yuhaoliu7456/Diff-Plugin @ 79e12bb, infer.py l.90, through
diffusers 0.17 `load_image`, utils/testing_utils.py l.262-290: PIL open, `ImageOps.exif_transpose`, convert
RGB) and adds what that one-liner gets wrong or leaves to a traceback:
- unreadable, truncated or non-image files raise `ImageError` (a ValueError) with a one-line message;
- 16-bit and 32-bit grey (PIL modes I;16*, I) and float (F) images are scaled to 8 bits (PIL's own
  `convert("RGB")` clips them, so a 16-bit photo comes out almost white);
- images with transparency (RGBA, LA, PA, P with a transparent colour) are composited on white. The
  official `convert("RGB")` drops alpha and shows whatever colour hides under transparent pixels (often
  black); white is what such a file looks like on a page. Fully opaque files give the same pixels either way;
- CMYK, YCbCr, LAB, 1-bit and palette images go through PIL's conversion to RGB.
Each such step is recorded in an optional `notes` list so the tools can write down what was done.

Size: the official code has two rules, both followed by a LANCZOS rescale to multiples of 8
(VaeImageProcessor.preprocess):
- "demo" (demo.py l.166-173, the prompt-driven entry point): the short side ALWAYS becomes `image_resolution`
  (512 by default, a 512-1024 slider in steps of 64), downscaling included; PIL bicubic, int() sizes;
- "infer" (infer.py l.96-107, the per-task script): the short side is raised to 512 only when a side is below
  512; bigger photos run at full size (a 2834x2091 photo runs out of GPU memory in the official code).
`photo_size` is the one size rule (either rule, a model working size, the cap, multiples of 8: the size and
the record's note, by arithmetic); `resize_photo` applies it to a photo. Sides under MIN_SIDE are refused by the
callers (`check_min_side`).
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from minidiff.errors import ImageError  # noqa: F401 (raised here, imported from here)
from minidiff.io.files import atomic_write

# Default cap on the long side of the processed image: 3072, so that the photo the official code runs out of
# memory on (2834x2091; infer.py's rule keeps it at full size) is restored at full size, and the 4:3 size just
# above it (3072x2304, 7.1 MP) too. It fits because the VAE goes through tiles above 1536x1024
# (minidiff.models.vae.TILE_ABOVE) and the UNet's attention runs in SDPA's fused kernels (no tokens x tokens matrix
# in memory): peak RSS of load + one restore, full-size SD-1.5 + CLIP ViT-L/14 + a plugin, random weights,
# fp32 on the CPU (tools/bench/bench_memory.py, 1 UNet step; the loaded weights alone 5.4 GiB): 6.38 GiB at
# 512x512, 8.50 GiB at 1152x864 (both one VAE pass), 6.82 GiB at 1632x1224 (tiles; 11.38 GiB in one pass),
# 7.96 GiB at 2304x1728 and 9.84 GiB for the 2834x2091 photo (tiles): well inside 24 GiB. GPU memory was
# measured before the VAE was tiled (fp16, H200): 3.3 GiB at 512x512, 8.1 GiB at 1536x1024, 23.7 GiB at
# 2048x1536, 75.6 GiB at 2832x2088; not remeasured since. --max-side 0: no cap.
DEFAULT_MAX_SIDE = 3072
OFFICIAL_SHORT_SIDE = 512  # infer.py l.96-107; demo.py's `image_resolution` default
# demo.py's "Image Resolution" slider (l.333): minimum 512, maximum 1024, step 64
SHORT_SIDES = tuple(range(512, 1024 + 1, 64))
RESIZE_RULES = ("demo", "infer")  # demo.py l.166-173 (short side always N) / infer.py l.96-107 (raise to 512)
# The smallest side processed: 8 latent cells, so that the UNet's three downsamplings keep at least one
# cell (smaller sizes break GroupNorm in small models and carry almost no picture anyway).
MIN_SIDE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm")


def _to_8bit(arr, mode):
    """Scale a 16/32-bit integer or float grey array to uint8 (PIL's convert would clip it)."""
    arr = arr.astype(np.float64)
    if mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        # float images are usually 0..1; anything else is stretched to its own range
        scale = 255.0 if (lo >= 0.0 and hi <= 1.0) else (255.0 / (hi - lo) if hi > lo else 0.0)
        arr = (arr - (0.0 if (lo >= 0.0 and hi <= 1.0) else lo)) * scale
    else:
        hi = float(arr.max()) if arr.size else 0.0
        # 8-bit values stored in a wide mode stay as they are; 16-bit range scales by 255/65535
        arr = arr if hi <= 255 else arr * (255.0 / (65535.0 if hi <= 65535 else hi))
    return np.clip(np.nan_to_num(arr).round(), 0, 255).astype(np.uint8)


def to_rgb(image, notes=None):
    """Any PIL image -> 8-bit RGB, as described in the module docstring. Appends what it did to `notes`."""
    notes = [] if notes is None else notes
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I") or mode == "F":
        grey = Image.fromarray(_to_8bit(np.asarray(image), mode), mode="L")
        notes.append(f"{mode} image scaled to 8 bits")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is not fully opaque
            notes.append(f"{mode} image: transparency composited on white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    notes.append(f"{mode} image converted to RGB")
    return image.convert("RGB")


def load_image(path, notes=None):
    """An image file as 8-bit RGB PIL image, upright (EXIF orientation applied); ImageError if unusable."""
    notes = [] if notes is None else notes
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # up to 2x PIL's MAX_IMAGE_PIXELS (~179 Mpx) is decoded (the cap downscales it); PIL refuses more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not later
                frames = getattr(im, "n_frames", 1)
                if frames > 1:  # an animated GIF/PNG/WebP or a multi-page TIFF: PIL gives the first frame
                    notes.append(f"animated or multi-frame image: the first of its {frames} frames is used")
                orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation tag
                upright = ImageOps.exif_transpose(im) if orientation not in (1, None) else im
                if orientation not in (1, None):
                    notes.append(f"EXIF orientation {orientation} applied")
                return to_rgb(upright, notes)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (or an unsupported format)") from None
    except Image.DecompressionBombError:
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise ImageError(f"{path}: image too large to decode safely (over {limit} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ImageError(f"{path}: unreadable or corrupt image ({first})") from None


def list_images(folder):
    """Image files directly inside `folder` (by suffix), sorted by name."""
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def _rule_size(width, height, rule, short_side, model_side):
    """The first step of the official rule, before multiples of 8. "demo" (demo.py l.166-172): the short side
    set to `short_side`, up or down. "infer" (infer.py l.96-107): when a side is below `model_side` (512 for
    SD 1.5), the short side raised to it; otherwise unchanged. The long side is int()-truncated; a square takes
    the else branch, as in the official code."""
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; known: {', '.join(RESIZE_RULES)}")
    if rule == "infer":
        if width >= model_side and height >= model_side:
            return width, height
        short_side = model_side
    if width < height:
        return short_side, int((short_side / width) * height)
    return int((short_side / height) * width), short_side


def photo_size(width, height, rule="infer", short_side=None, max_side=DEFAULT_MAX_SIDE,
               model_side=OFFICIAL_SHORT_SIDE):
    """THE size rule, by arithmetic only: ((w, h) the plugins run at, multiples of 8; the record's one-line note).

    rule "demo": short side always `short_side` (default `model_side`); "infer": short side raised to
    `model_side` when a side is below it. `model_side` is the model's working short side (SD 1.5: 512; a small
    model family its own, e.g. 128 or 256). Then multiples of 8, unless the long side would exceed `max_side`
    (None or 0: no cap, as official); then one rescale of the original so the long side is max_side (multiples
    of 8). Used alike by the CLI's dry run, the page's plan and the restore path (`resize_photo`).
    """
    short_side = model_side if short_side is None else short_side
    rw, rh = _rule_size(width, height, rule, short_side, model_side)
    ow, oh = rw - rw % 8, rh - rh % 8
    name = f"official rule of {rule}.py" + (f" (short side {short_side})" if rule == "demo" else
                                            f" (short side raised to {model_side} when below)")
    if not max_side or max(ow, oh) <= max_side:
        if (ow, oh) == (width, height):
            return (ow, oh), f"{width}x{height} -> {width}x{height}: unchanged"
        then = f", then {ow}x{oh} (multiples of 8)" if (rw, rh) != (ow, oh) else ""
        return (ow, oh), f"{width}x{height} -> {rw}x{rh}: {name}{then}"
    cw, ch = _rescaled_size(width, height, max_side / max(width, height))
    return (cw, ch), (f"{width}x{height} -> {cw}x{ch}: capped ({name} gives {ow}x{oh}, long side "
                      f"over --max-side {max_side}; rescaled so the long side is {max_side})")


def official_resize(image, rule="infer", short_side=OFFICIAL_SHORT_SIDE):
    """The official resolution rule: its first step (`photo_size`) with PIL bicubic (demo.py l.173 and infer.py l.104 call
    `image.resize(size)`, whose default filter for RGB is BICUBIC; the same size is a copy), then the LANCZOS
    rescale to multiples of 8 of diffusers' VaeImageProcessor.preprocess."""
    size = _rule_size(*image.size, rule, short_side, OFFICIAL_SHORT_SIDE)
    image = image if size == image.size else image.resize(size, Image.BICUBIC)
    return to_multiple_of_8(image)


def to_multiple_of_8(image):
    """Rescale (not crop) to (W - W % 8, H - H % 8) with LANCZOS, as VaeImageProcessor (a copy if there)."""
    w, h = image.size
    if w < 8 or h < 8:
        raise ValueError(f"image {w}x{h} is too small; apply official_resize() first")
    return image.resize((w - w % 8, h - h % 8), Image.LANCZOS)


def pil_to_tensor(image):
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1] (uint8 / 255, then 2x - 1, as VaeImageProcessor)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB")).astype(np.float32) / 255.0)  # [H, W, 3]
    return (2.0 * x - 1.0).permute(2, 0, 1)[None].contiguous()  # [1, 3, H, W]


def tensor_to_pil(x):
    """[1, 3, H, W] decoder output, about [-1, 1] -> PIL RGB, as diffusers' VaeImageProcessor.postprocess
    (the official code's and the SD pipelines'): (x/2 + 0.5).clamp(0, 1) in x's dtype, then float32, x 255,
    rounded half-to-even. A half-precision decode thus rounds where diffusers' does."""
    x = (x[0] / 2 + 0.5).clamp(0, 1)  # [3, H, W] in x's dtype
    x = x.permute(1, 2, 0).float().cpu().numpy()  # [H, W, 3]
    return Image.fromarray((x * 255).round().astype(np.uint8))


def _rescaled_size(width, height, scale):
    """Sides times `scale`, rounded then floored to multiples of 8 (at least 8)."""
    return tuple(max(8, round(v * scale) // 8 * 8) for v in (width, height))


def _rescale(image, scale):
    """Resize by `scale` to _rescaled_size; LANCZOS down, BICUBIC up."""
    size = _rescaled_size(*image.size, scale)
    return image.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC)


def cap_size(image, max_side=DEFAULT_MAX_SIDE):
    """Downscale once so the long side is <= max_side (multiples of 8): (image, note), or (image, None)
    unchanged when it already fits or max_side is None or 0 (no cap). For img2img."""
    w, h = image.size
    if not max_side or max(w, h) <= max_side:
        return image, None
    out = _rescale(image, max_side / max(w, h))
    return out, f"{w}x{h} -> {out.size[0]}x{out.size[1]}: downscaled to --max-side {max_side} (LANCZOS)"


def resize_photo(image, rule="infer", short_side=None, max_side=DEFAULT_MAX_SIDE, model_side=OFFICIAL_SHORT_SIDE):
    """`photo_size`'s rule applied to the photo: (photo before the multiples of 8, note).

    The rule's own size with PIL bicubic, exactly as the official scripts resize; when capped, one rescale
    (LANCZOS down, BICUBIC up) to the capped size: a downscale of a big photo, or, for a small elongated one
    that the rule would stretch past the cap, a smaller upscale. The plugins then rescale to multiples of 8
    (`to_multiple_of_8`).
    """
    size, note = photo_size(*image.size, rule, short_side, max_side, model_side)
    if "capped (" in note:
        return image.resize(size, Image.LANCZOS if max_side < max(image.size) else Image.BICUBIC), note
    size = _rule_size(*image.size, rule, model_side if short_side is None else short_side, model_side)
    return (image if size == image.size else image.resize(size, Image.BICUBIC)), note


def fit_size(image, max_side=DEFAULT_MAX_SIDE):
    """infer.py's rule with the cap, to multiples of 8: resize_photo(image, "infer", max_side=...)."""
    out, note = resize_photo(image, "infer", max_side=max_side)
    return to_multiple_of_8(out), note


def check_min_side(size, what="the processed photo"):
    """ImageError (one line) when a side of `size` is under MIN_SIDE: an aspect ratio too extreme for the
    size rule (and the cap) to keep both sides usable."""
    w, h = size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{what} would be {w}x{h}: a side under {MIN_SIDE} px (aspect ratio "
                         f"{max(w, h) / max(1, min(w, h)):.0f}:1 is too extreme); crop the photo first")


def side_by_side(a, b):
    """Input `a` resized to the result's size (PIL bicubic, as infer.py l.159) | result `b`, in one image."""
    b = b.convert("RGB")
    a = a.convert("RGB")
    a = a if a.size == b.size else a.resize(b.size, Image.BICUBIC)
    out = Image.new("RGB", (a.width + b.width, b.height))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    return out


def save_png_atomic(image, path):
    """Save a PIL image as PNG at `path` without ever leaving a half-written file there."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
