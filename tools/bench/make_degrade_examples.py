#!/usr/bin/env python
"""Render a labelled grid of a photo and its eight synthetic degradations (minidiff/train/degrade.py).

    python tools/bench/make_degrade_examples.py              # examples/chelsea-blur.jpg -> docs/degradations.png
    python tools/bench/make_degrade_examples.py --input photo.jpg --output /tmp/grid.png --tile 256 --seed 3

CPU only, under a second. The photo is centre-cropped to a square and resized to --size, the size the
degradation runs at (its pixel-scale effects, streaks, flakes, noise, moire bands, depend on it); each
result is then shrunk to a --tile square for the grid.
"""
import argparse
import os
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), *up) for up in ([".."], ["..", ".."])]  # tools/, the checkout
from minidiff.train.degrade import DEGRADATIONS, degrade  # noqa: E402
from minidiff.io.files import atomic_write  # noqa: E402
from minidiff.io.imageio import ImageError, load_image  # noqa: E402

COLUMNS = 3
LABEL_HEIGHT = 16  # px strip above each tile for its name


def square(photo, size):
    """Centre crop to a square, resized to size x size (LANCZOS)."""
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    return photo.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def grid(photo, tile, seed):
    """One labelled image: the photo, then each task's degradation of it, COLUMNS tiles a row."""
    panels = [("clean", photo)] + [(task, degrade(task, photo, seed)) for task in DEGRADATIONS]
    rows = -(-len(panels) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * tile, rows * (tile + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (name, image) in enumerate(panels):
        x, y = (i % COLUMNS) * tile, (i // COLUMNS) * (tile + LABEL_HEIGHT)
        draw.text((x + 4, y + 2), name, fill="black", font=font)
        sheet.paste(image.resize((tile, tile), Image.LANCZOS), (x, y + LABEL_HEIGHT))
    return sheet


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", default="examples/chelsea-blur.jpg", help="photo to degrade")
    parser.add_argument("--output", default="docs/degradations.png", help="PNG to write")
    parser.add_argument("--size", type=int, default=320, help="side of the square the degradations run at")
    parser.add_argument("--tile", type=int, default=160, help="side of each tile in the grid")
    parser.add_argument("--seed", type=int, default=0, help="seed passed to degrade() for every task")
    args = parser.parse_args()
    print(" ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    try:
        photo = square(load_image(args.input), args.size)
    except ImageError as e:
        sys.exit(f"error: {e}")
    sheet = grid(photo, args.tile, args.seed)
    atomic_write(args.output, lambda tmp: sheet.save(tmp, format="PNG", optimize=True))
    print(f"{args.output}: {sheet.width}x{sheet.height}, {os.path.getsize(args.output) // 1024} KiB")


if __name__ == "__main__":
    main()
