#!/usr/bin/env python
"""Convert Diff-Plugin plugins and the plugin selector between the official layout and minidiff's files.

Official (yuhaoliu7456/Diff-Plugin @ 79e12bb, pre-trained/): `<task>/scb/config.json` +
`<task>/scb/diffusion_pytorch_model.bin` (diffusers names) + `<task>/tpb.pt` ({'model': state dict}), and
`plugin_selector/PromptTunner.pt`. minidiff: one `<task>.safetensors` per plugin (metadata: task, base model,
steps trained) and `selector.safetensors`. The direction follows the input:

    python tools/convert.py pre-trained/derain plugins/derain.safetensors      # official plugin -> minidiff
    python tools/convert.py plugins/derain.safetensors exported/derain         # minidiff -> official folder
    python tools/convert.py pre-trained/plugin_selector/PromptTunner.pt plugins/selector.safetensors
    python tools/convert.py plugins/selector.safetensors exported/PromptTunner.pt
    python tools/convert.py pre-trained/ plugins/                              # every plugin + the selector

Files written by the minidiff -> official direction load in the official infer.py/demo.py unchanged.
Outputs are written under a temporary name and renamed; an existing output is never overwritten without
--overwrite. Pickles are read with torch.load(weights_only=True) only.
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _cli, also when loaded by path (tests)
from _cli import OneLineParser  # noqa: E402
from minidiff.io.files import atomic_write  # noqa: E402
from minidiff.plugin.files import (OFFICIAL_BASE_MODEL, PLUGIN_FORMAT, export_official_plugin,
                                   export_official_selector, find_plugins, load_plugin, load_selector,
                                   read_format, save_plugin, save_selector)  # noqa: E402
from minidiff.io.weights import CheckpointError  # noqa: E402


def _to_file(write, out, overwrite):
    """Write a single file through a temporary name in the same folder."""
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    atomic_write(out, write)


def _to_folder(plugin, out, overwrite):
    """Write an official plugin folder: built complete under a temporary name, then moved into place."""
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    tmp = f"{out.rstrip(os.sep)}.new{os.getpid()}"
    export_official_plugin(plugin, tmp)
    if os.path.exists(out):
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    os.replace(tmp, out)


def convert(src, out, args):
    """Convert one input; returns a list of 'what -> where' lines."""
    meta = {"base_model": args.base_model, "steps_trained": args.steps_trained, "converted_from": src}
    if os.path.isdir(src) and os.path.isdir(os.path.join(src, "scb")):  # official plugin folder
        plugin = load_plugin(src, task=args.task)
        if not out.endswith(".safetensors"):
            raise ValueError(f"{out}: a minidiff plugin file must end in .safetensors")
        _to_file(lambda tmp: save_plugin(plugin, tmp, meta), out, args.overwrite)
        return [f"plugin {plugin.task}: {src} -> {out}"]
    if os.path.isdir(src):  # a pre-trained/ folder: every official plugin and the selector
        found = {t: p for t, p in find_plugins(src).items() if os.path.isdir(p)}
        selector = os.path.join(src, "plugin_selector", "PromptTunner.pt")
        if not found and not os.path.isfile(selector):
            raise ValueError(f"{src}: no official plugin folders (<task>/scb/, <task>/tpb.pt) nor selector")
        os.makedirs(out, exist_ok=True)
        done = []
        for task, path in found.items():
            done += convert(path, os.path.join(out, f"{task}.safetensors"), args)
        if os.path.isfile(selector):
            done += convert(selector, os.path.join(out, "selector.safetensors"), args)
        return done
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.endswith(".safetensors") and read_format(src) == PLUGIN_FORMAT:  # minidiff plugin -> official
        plugin = load_plugin(src, task=args.task)
        _to_folder(plugin, out, args.overwrite)
        return [f"plugin {plugin.task}: {src} -> {out}/ (scb/config.json, scb/*.bin, tpb.pt)"]
    selector = load_selector(src)  # PromptTunner.pt or a minidiff selector file (raises when neither)
    if src.endswith(".safetensors"):
        if os.path.exists(out) and not args.overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        export_official_selector(selector, out)
    else:
        if not out.endswith(".safetensors"):
            raise ValueError(f"{out}: a minidiff selector file must end in .safetensors")
        _to_file(lambda tmp: save_selector(selector, tmp, meta), out, args.overwrite)
    return [f"selector: {src} -> {out}"]


def main(argv=None):
    parser = OneLineParser(__doc__, prog="convert.py")
    a = parser.add_argument
    a("input", help="official plugin folder, pre-trained/ folder, PromptTunner.pt, or a minidiff "
                    ".safetensors (plugin or selector)")
    a("output", help="minidiff .safetensors (from official), official folder or .pt (from minidiff), or a "
                     "folder (from pre-trained/)")
    a("--task", help="task name (default: the folder name / the file's metadata)")
    a("--base-model", default=OFFICIAL_BASE_MODEL,
      help="metadata: the SD model the plugin was trained on (official -> minidiff)")
    a("--steps-trained", default="unknown", help="metadata: training steps (official -> minidiff)")
    a("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        for line in convert(os.path.normpath(args.input), os.path.normpath(args.output), args):
            print(line)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
