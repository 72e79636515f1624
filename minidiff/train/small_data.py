"""The small model family's training photos (issue 18): the committed manifest and the prepared folder.

`minidiff/data/small_photos.json` names every photo: where it comes from (a PyPI wheel or a Debian package,
pinned by version, the path inside it and the sha256 of that file), its licence and author as the package
states them, and its split ("train" or "heldout"; held-out photos come from other packages and scenes than
the training ones, so that no stage trains on them). `python tools/small_data.py --output data/small` builds
the prepared folder from it:

    data/small/train/<id>[-a|-b].png     RGB PNG, PIL bicubic resize to short side 256
    data/small/heldout/<id>[-a|-b].png
    data/small/manifest.json             the files written, each with its sha256; "complete": true at the end

Views: "full" is the whole photo (`<id>.png`); a photo whose short side is at least 1000 px also gives "a" and
"b", the first and second half along its long side (`<id>-a.png`, `<id>-b.png`): a 2x zoom, resized the same
way. `photo_paths(root, split)` is what training and evaluation read: the prepared files of one split, each
checked against the prepared folder's manifest. Nothing here is a runtime dependency of minidiff.
"""
import bz2
import json
import os

from minidiff.errors import UsageError
from minidiff.io.files import sha256_file

MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "small_photos.json")
PREPARED_FORMAT = "minidiff-small-photos-prepared/1"
SPLITS = ("train", "heldout")
SHORT_SIDE = 256
PREPARE_HINT = "run `python tools/small_data.py --output DIR` to prepare it"


def load_manifest(path=MANIFEST):
    """The committed photo manifest (a dict with "photos": one entry per source photo)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def view_name(photo_id, view):
    return f"{photo_id}.png" if view == "full" else f"{photo_id}-{view}.png"


def expected_files(manifest, split=None):
    """Relative paths ("train/<id>.png", ...) the prepared folder holds for `split` (None: both)."""
    return [f"{p['split']}/{view_name(p['id'], v)}" for p in manifest["photos"]
            if split is None or p["split"] == split for v in p["views"]]


def view_box(size, view):
    """Pixel box (left, top, right, bottom) of a view of an image of `size` = (w, h)."""
    w, h = size
    if view == "full":
        return (0, 0, w, h)
    first = view == "a"
    if w >= h:
        return (0, 0, w // 2, h) if first else (w - w // 2, 0, w, h)
    return (0, 0, w, h // 2) if first else (0, h - h // 2, w, h)


def decode_source(path, fmt="image"):
    """The source file as a PIL RGB image ("image": anything PIL reads; "scipy-face": scipy.misc's face.dat)."""
    from PIL import Image
    if fmt == "scipy-face":
        import numpy as np
        with open(path, "rb") as f:
            raw = bz2.decompress(f.read())
        return Image.fromarray(np.frombuffer(raw, dtype=np.uint8).reshape(768, 1024, 3).copy(), "RGB")
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


def resize_short_side(im, short_side=SHORT_SIDE):
    """PIL bicubic resize so that the shorter side is `short_side` px (the other side rounded)."""
    from PIL import Image
    w, h = im.size
    if w <= h:
        size = (short_side, max(1, round(h * short_side / w)))
    else:
        size = (max(1, round(w * short_side / h)), short_side)
    return im.resize(size, Image.BICUBIC)


def photo_paths(root, split):
    """Sorted paths of the prepared photos of `split` ("train" or "heldout") under `root`.

    Each file must be listed in `root`/manifest.json (written by tools/small_data.py, complete) and match its
    sha256; anything else is a one-line UsageError naming the file.
    """
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    index = os.path.join(root, "manifest.json")
    try:
        with open(index, encoding="utf-8") as f:
            prepared = json.load(f)
        files = prepared["files"]
    except FileNotFoundError:
        raise UsageError(f"{index}: no prepared photo folder there; {PREPARE_HINT.replace('DIR', str(root))}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{index}: unreadable ({type(e).__name__}); "
                         f"{PREPARE_HINT.replace('DIR', str(root))}") from None
    if not prepared.get("complete"):
        raise UsageError(f"{index}: the preparation did not finish; {PREPARE_HINT.replace('DIR', str(root))}")
    paths = []
    for rec in files:
        if rec.get("split") != split:
            continue
        path = os.path.join(root, rec["file"])
        if not os.path.isfile(path):
            raise UsageError(f"{path}: missing from the prepared photos; {PREPARE_HINT.replace('DIR', str(root))}")
        if sha256_file(path) != rec["sha256"]:
            raise UsageError(f"{path}: sha256 does not match {index}; {PREPARE_HINT.replace('DIR', str(root))}")
        paths.append(path)
    if not paths:
        raise UsageError(f"{index}: no {split} photos listed; {PREPARE_HINT.replace('DIR', str(root))}")
    return sorted(paths)
