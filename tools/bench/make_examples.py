#!/usr/bin/env python
"""Make examples/: public-domain photos from scikit-image's data, degraded (rain, haze, blur, low light).

The sources are four photos shipped inside the scikit-image wheel (skimage/data/), each public domain or CC0
according to its docstring in skimage/data/_fetchers.py (see examples/README.md). The degradations are simple
numpy/scipy models written here, seeded, so the files can be remade bit for bit:

    pip download --no-deps scikit-image==0.26.0 -d /tmp/skimage     # the wheel only; nothing is installed
    python tools/bench/make_examples.py --source /tmp/skimage/scikit_image-0.26.0-*.whl --output examples

No network access here: --source is a wheel file or an unpacked skimage/data folder.
"""
import glob
import hashlib
import io
import os
import sys
import zipfile

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), *up) for up in ([".."], ["..", ".."])]  # tools/, the checkout
from _cli import OneLineParser  # noqa: E402
from minidiff.io.files import atomic_write, save_json_atomic  # noqa: E402
from minidiff.io.imageio import ImageError, to_rgb  # noqa: E402

# source file -> (sha256 as in scikit-image's skimage/data/_registry.py, licence from its docstring)
SOURCES = {
    "coffee.png": ("cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
                   "CC0 by the photographer (Rachel Michetti), courtesy of Pikolo Espresso Bar"),
    "rocket.jpg": ("c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
                   "public domain (SpaceX launch photo of DSCOVR on Falcon 9)"),
    "chelsea.png": ("596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
                    "CC0 by the photographer (Stefan van der Walt)"),
    "astronaut.png": ("88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
                      "public domain (NASA photo of Eileen Collins)"),
}
MAX_SIDE = 480  # examples stay small: a quick CPU run, and the folder well under 1.5 MB


def rain(img, rng):
    """Rain streaks: sparse bright drops smeared along a slanted line, added on a slightly greyed photo."""
    h, w, _ = img.shape
    drops = (rng.random((h, w)) > 0.995).astype(np.float64) * rng.uniform(0.5, 1.0, (h, w))
    kernel = np.zeros((17, 17))
    for i in range(17):  # a line 17 px long, about 20 degrees from vertical
        kernel[i, int(round(8 + (i - 8) * np.tan(np.radians(20))))] = 1.0
    streaks = ndimage.convolve(drops, kernel, mode="wrap")
    streaks = ndimage.gaussian_filter(streaks, 0.6)
    grey = 0.85 * img + 0.1
    return grey + 0.65 * np.clip(streaks, 0, 1)[..., None]


def haze(img, rng):
    """Haze by the atmospheric scattering model I = J t + A (1 - t), depth growing towards the top."""
    h, w, _ = img.shape
    depth = np.linspace(1.0, 0.2, h)[:, None] + 0.05 * rng.standard_normal((1, w)).cumsum(1) / np.sqrt(w)
    t = np.exp(-2.0 * np.clip(depth, 0, 1))[..., None]  # transmission ~0.14 (top) .. 0.67 (bottom)
    airlight = np.array([0.86, 0.87, 0.9])
    return img * t + airlight * (1 - t)


def blur(img, rng):
    """Camera shake: a short random-walk motion kernel plus slight defocus."""
    kernel = np.zeros((21, 21))
    y, x = 10.0, 10.0
    for _ in range(40):  # random walk with momentum, mostly horizontal
        kernel[int(round(y)), int(round(x))] += 1.0
        x = np.clip(x + rng.normal(0.25, 0.3), 0, 20)
        y = np.clip(y + rng.normal(0.0, 0.25), 0, 20)
    kernel /= kernel.sum()
    out = np.stack([ndimage.convolve(img[..., c], kernel, mode="reflect") for c in range(3)], -1)
    return ndimage.gaussian_filter(out, (1.0, 1.0, 0))


def lowlight(img, rng):
    """Under-exposure: gamma 2.2 darkening to about a fifth of the light, plus sensor noise."""
    dark = 0.22 * img ** 2.2
    return dark + rng.normal(0.0, 0.012, img.shape) * np.sqrt(dark + 0.01)


# output stem -> (source, degradation, a prompt a user would write for it)
EXAMPLES = {
    "coffee-rain": ("coffee.png", rain, "please remove the rain"),
    "rocket-haze": ("rocket.jpg", haze, "remove the haze from this photo"),
    "chelsea-blur": ("chelsea.png", blur, "make this blurry photo sharp"),
    "astronaut-lowlight": ("astronaut.png", lowlight, "brighten this dark photo"),
}


def read_source(source, name):
    """Bytes of skimage/data/<name> from a wheel or a folder, checked against scikit-image's own sha256."""
    if os.path.isdir(source):
        with open(os.path.join(source, name), "rb") as f:
            data = f.read()
    else:
        with zipfile.ZipFile(source) as z:
            data = z.read(f"skimage/data/{name}")
    if hashlib.sha256(data).hexdigest() != SOURCES[name][0]:
        raise ValueError(f"{name}: sha256 differs from scikit-image's registry (expected the 0.26.0 file)")
    return data


def main():
    parser = OneLineParser(__doc__, prog="make_examples.py")
    parser.add_argument("--source", required=True, help="scikit-image wheel (.whl) or its skimage/data dir")
    parser.add_argument("--output", default="examples", help="folder to write the examples into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the degradations")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the written examples")
    args = parser.parse_args()
    matches = glob.glob(args.source)
    if len(matches) != 1:
        sys.exit(f"error: --source {args.source}: expected one wheel or folder, found {len(matches)}")
    os.makedirs(args.output, exist_ok=True)
    prompts = {}
    for i, (stem, (name, degrade, prompt)) in enumerate(EXAMPLES.items()):
        try:
            photo = to_rgb(Image.open(io.BytesIO(read_source(matches[0], name))))
        except (OSError, KeyError, ValueError, ImageError) as e:
            sys.exit(f"error: {matches[0]}: {name}: {e}")
        scale = min(1.0, MAX_SIDE / max(photo.size))
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS)
        rng = np.random.default_rng(args.seed + i)
        out = degrade(np.asarray(photo, np.float64) / 255.0, rng)
        out = Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        path = os.path.join(args.output, stem + ".jpg")
        atomic_write(path, lambda tmp: out.save(tmp, format="JPEG", quality=args.quality))
        prompts[stem] = prompt
        print(f"{path}: {out.width}x{out.height}, {os.path.getsize(path) // 1024} KiB, from {name}")
    save_json_atomic(prompts, os.path.join(args.output, "prompts.json"))


if __name__ == "__main__":
    main()
