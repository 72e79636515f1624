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
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open

from minidiff import plugin as P
from minidiff.imageio import atomic_write
from minidiff import selector as S
from minidiff.weights import CheckpointError, scb_to_diffusers

OFFICIAL_BASE_MODEL = "CompVis/stable-diffusion-v1-4"  # the official plugins' base model (infer.py l.22)


def official_scb_config(cfg):
    """scb/config.json as the released ones (derain's key set), for a PluginConfig."""
    return {"_class_name": "SCBNet", "_diffusers_version": "0.17.1", "act_fn": "silu",
            "attention_head_dim": cfg.heads, "block_out_channels": [cfg.channels], "class_embed_type": None,
            "conditioning_embedding_out_channels": [16, 32, 96, 256],
            "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": cfg.context_dim,
            "down_block_types": ["CrossAttnDownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True,
            "freq_shift": 0, "global_pool_conditions": False, "in_channels": cfg.latent_channels,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "num_class_embeds": None, "only_cross_attention": False,
            "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default",
            "upcast_attention": False, "use_linear_projection": False}


def _contiguous(sd):
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _replace(tmp, out, overwrite):
    """Move the finished temporary output into place (a folder or a file)."""
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    os.replace(tmp, out)


def plugin_to_official(plugin, out, overwrite=False):
    """Write `plugin` as an official `<task>/` folder (scb/config.json, scb/*.bin, tpb.pt), atomically."""
    tmp = f"{out.rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(os.path.join(tmp, "scb"))
    try:
        with open(os.path.join(tmp, "scb", "config.json"), "w") as f:
            json.dump(official_scb_config(plugin.scb.cfg), f, indent=2, sort_keys=True)
        torch.save(scb_to_diffusers(_contiguous(plugin.scb.state_dict())),
                   os.path.join(tmp, "scb", "diffusion_pytorch_model.bin"))
        torch.save({"model": _contiguous(plugin.tpb.state_dict())}, os.path.join(tmp, "tpb.pt"))
        _replace(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_file(write, out, overwrite):
    """Write a single file through a temporary name in the same folder."""
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    atomic_write(out, write)


def _format(path):
    """The minidiff "format" metadata of a .safetensors file ('' when none)."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except Exception as e:  # safetensors' own error types: truncated, not safetensors at all
        raise CheckpointError(f"{path}: not a readable .safetensors file "
                              f"({str(e).splitlines()[0]})") from None


def convert(src, out, args):
    """Convert one input; returns a list of 'what -> where' lines."""
    meta = {"base_model": args.base_model, "steps_trained": args.steps_trained, "converted_from": src}
    if os.path.isdir(src) and os.path.isdir(os.path.join(src, "scb")):  # official plugin folder
        plugin = P.load_plugin(src, task=args.task)
        if not out.endswith(".safetensors"):
            raise ValueError(f"{out}: a minidiff plugin file must end in .safetensors")
        _to_file(lambda tmp: P.save_plugin(plugin, tmp, meta), out, args.overwrite)
        return [f"plugin {plugin.task}: {src} -> {out}"]
    if os.path.isdir(src):  # a pre-trained/ folder: every official plugin and the selector
        found = {t: p for t, p in P.find_plugins(src).items() if os.path.isdir(p)}
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
    if src.endswith(".safetensors") and _format(src) == P.FORMAT:  # minidiff plugin -> official folder
        plugin = P.load_plugin(src, task=args.task)
        plugin_to_official(plugin, out, args.overwrite)
        return [f"plugin {plugin.task}: {src} -> {out}/ (scb/config.json, scb/*.bin, tpb.pt)"]
    selector = S.load_selector(src)  # PromptTunner.pt or a minidiff selector file (raises when neither)
    if src.endswith(".safetensors"):
        sd = _contiguous(selector.state_dict())
        _to_file(lambda tmp: torch.save({"model": sd}, tmp), out, args.overwrite)
    else:
        if not out.endswith(".safetensors"):
            raise ValueError(f"{out}: a minidiff selector file must end in .safetensors")
        _to_file(lambda tmp: S.save_selector(selector, tmp, meta), out, args.overwrite)
    return [f"selector: {src} -> {out}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    a("input", help="official plugin folder, pre-trained/ folder, PromptTunner.pt, or a minidiff "
                    ".safetensors (plugin or selector)")
    a("output", help="minidiff .safetensors (from official), official folder or .pt (from minidiff), or a "
                     "folder (from pre-trained/)")
    a("--task", default=None, help="task name (default: the folder name / the file's metadata)")
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
