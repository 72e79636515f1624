"""Which weights a tool runs on: the published ones (SD 1.4/1.5, CLIP ViT-L/14, the official Diff-Plugins)
or minidiff's own small family (checkpoints/small/, trained by tools/train_small.py, shipped in git).

    --model auto        the published weights when checkpoints/ has them, else the small family (one notice)
    --model small       the small family (checkpoints/small/: sd, clip_vision, plugins/, selector)
    --model published   the published weights (tools/download.py fetches them)

The small family's files are checked against the sha256 in its manifest.json before anything loads, so a
truncated or altered file is refused in one line naming it (CheckpointError).
"""
import json
import os

from minidiff.errors import CheckpointError, UsageError
from minidiff.io.files import sha256_file

MODELS = ("auto", "small", "published")
SMALL = "small"  # the family's folder under checkpoints/
SMALL_WORKING_SIZE = 128  # short side the small family was trained at (minidiff.train.small.SIZE)
NOTICE = ("note: the published weights are not in {root}; running minidiff's small family ({small}): "
          "trained here on ~40 photos, 128 px, for seeing the method work. python tools/download.py "
          "fetches the published ones (then --model auto takes them)")


def small_paths(base):
    """{sd, clip, plugins, selector, manifest} of the small family in the folder `base` (checkpoints/small)."""
    return {"sd": os.path.join(base, "sd.safetensors"), "clip": os.path.join(base, "clip_vision.safetensors"),
            "plugins": os.path.join(base, "plugins"), "selector": os.path.join(base, "selector.safetensors"),
            "manifest": os.path.join(base, "manifest.json")}


def verify_small(base, parts=("sd", "clip", "plugins", "selector")):
    """Check the small family's files in `base` against its manifest.json (sha256, size): CheckpointError
    naming the first bad or missing file. parts: which of them the caller will load."""
    paths = small_paths(base)
    try:
        with open(paths["manifest"]) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{paths['manifest']}: unreadable small-family manifest ({e}); restore it "
                              "with git checkout checkpoints/small") from None
    wanted = {"sd": ("sd.safetensors",), "clip": ("clip_vision.safetensors",),
              "selector": ("selector.safetensors",)}
    for name, info in sorted(files.items()):
        part = next((p for p, names in wanted.items() if name in names), "plugins")
        if part not in parts:
            continue
        path = os.path.join(base, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (small family; restore it with git checkout "
                                  "checkpoints/small)")
        if os.path.getsize(path) != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"{path}: corrupt or altered (size or sha256 differs from "
                                  f"{paths['manifest']}); restore it with git checkout checkpoints/small")


def small_working_size(base):
    """The short side the family in `base` was trained at: its manifest's "working_size" (default 128)."""
    try:
        with open(small_paths(base)["manifest"]) as f:
            return int(json.load(f).get("working_size", SMALL_WORKING_SIZE))
    except (OSError, ValueError, TypeError):
        return SMALL_WORKING_SIZE


def published_present(paths, parts):
    """True when every file of `parts` (keys of minidiff.download.default_checkpoint_paths' dict; sd14 for
    restoration, sd for generation) is there."""
    from minidiff.download import loader_files_missing
    kinds = {"sd": "sd", "sd14": "sd", "clip": "clip", "plugins": "plugins", "selector": "selector"}
    return all(not loader_files_missing(kinds[p], paths[p]) for p in parts)


def choose_model(model, root, parts):
    """The model family a tool runs: "published" or "small", and a notice line (or None) to print.

    model: auto | small | published; root: the checkpoints folder; parts: the published files the tool
    needs (e.g. ("sd14", "clip", "plugins")). auto takes the published weights when all of `parts` are
    there, else the small family when it is there (with the notice), else "published" (whose missing files
    the tool then lists, as before)."""
    if model not in MODELS:
        raise UsageError(f"--model {model}: choose one of {', '.join(MODELS)}")
    if model != "auto":
        return model, None
    from minidiff.download import default_checkpoint_paths
    if published_present(default_checkpoint_paths(root), parts):
        return "published", None
    if os.path.isfile(small_paths(os.path.join(root, SMALL))["manifest"]):
        return "small", NOTICE.format(root=root, small=os.path.join(root, SMALL))
    return "published", None
