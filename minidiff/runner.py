"""The work behind tools/sample.py's plugin mode, usable from Python: models, one photo in, outputs + record.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024).
Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, demo.py (selector, then the chained plugins) and infer.py
(one photo in, one side-by-side out). minidiff.plugin holds the sampling loop and minidiff.selector the
scoring; this file adds what a tool needs around them: random tiny models (`fake_models`), loading from files
(`load_models`), the list of photos and instructions (`plan_inputs`), and `run_photo`, which writes
<stem>.png, <stem>-compare.png and a JSON record of what was done.

    models, files = load_models(sd="checkpoints/...", clip="...", plugins="...", tasks=["derain"])
    record = run_photo(models, "photo.jpg", "out/", tasks=["derain"])
"""
import json
import os
import time
from dataclasses import dataclass, replace

import torch

from minidiff.files import save_json_atomic
from minidiff.imageio import (DEFAULT_MAX_SIDE, IMAGE_SUFFIXES, fit_size, list_images, load_image,
                              save_png_atomic, side_by_side)

FAKE_WARNING = "FAKE WEIGHTS: random tiny models, the images mean nothing (for trying the tools and tests)"


class UsageError(ValueError):
    """A mistake in what the user asked for (arguments, input files): one line, no traceback."""


class MissingPlugins(FileNotFoundError):
    """Plugin files asked for but not in the plugin folder; `paths` lists where they were expected."""

    def __init__(self, paths):
        super().__init__(f"missing plugins: {', '.join(paths)}")
        self.paths = paths


@dataclass
class Models:
    """What the plugin mode runs: SD 1.x parts, CLIP ViT-L/14 vision, {task: TaskPlugin}, the selector."""
    sd: object
    clip_vision: torch.nn.Module
    plugins: dict
    selector: torch.nn.Module | None
    fake: bool = False


def fake_models(tasks, with_selector=True, device="cpu", dtype=torch.float32, seed=0):
    """Random tiny models with matching widths (no files): SD, CLIP vision, one plugin per task, a selector.

    Seeded, so the same call gives the same weights. Widths: text = UNet context = TPB output = selector
    = 128; the VAE keeps 4 levels so that latents are 1/8 of the image, as in SD.
    """
    from minidiff.clip import TINY_CLIP_TEXT, TINY_CLIP_VISION, CLIPTextModel, CLIPVisionModel
    from minidiff.plugin import SCB, TINY_PLUGIN, TPB, TaskPlugin
    from minidiff.selector import PluginSelector
    from minidiff.tokenizer import CLIPTokenizer
    from minidiff.unet import TINY_UNET, UNet
    from minidiff.vae import TINY_VAE, AutoencoderKL
    from minidiff.loading import StableDiffusion
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    width = TINY_CLIP_TEXT.width
    # no attention at the full latent resolution: it is what makes a tiny UNet slow on a CPU
    unet_cfg = replace(TINY_UNET, context_dim=width, attention_levels=(1, 2), heads=2)
    vae = AutoencoderKL(replace(TINY_VAE, ch_mult=(1, 1, 1, 1)))
    sd = StableDiffusion(CLIPTokenizer(), CLIPTextModel(TINY_CLIP_TEXT), UNet(unet_cfg), vae)
    pcfg = replace(TINY_PLUGIN, clip_dim=TINY_CLIP_VISION.width, context_dim=width,
                   channels=unet_cfg.model_channels)
    plugins = {t: TaskPlugin(t, TPB(pcfg), SCB(pcfg)) for t in tasks}
    for plugin in plugins.values():  # zero convs made non-zero, so that a plugin changes the output
        for conv in plugin.scb.zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.05)
    selector = PluginSelector(width) if with_selector else None
    clip = CLIPVisionModel(TINY_CLIP_VISION)
    torch.random.set_rng_state(gen_state)  # leave the caller's global RNG as it was
    for m in [sd.text_encoder, sd.unet, sd.vae, clip, *plugins.values()] + ([selector] if selector else []):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Models(sd, clip, plugins, selector, fake=True)


def load_models(sd, clip, plugins, tasks=None, selector=None, dtype=torch.float32, device="cpu"):
    """Models from files, and {name: path} of every file used (for hashes).

    plugins: a folder (official <task>/ folders or <task>.safetensors); tasks: the plugins to load (default:
    all found, which the selector needs); selector: its file, or None when no selection is wanted.
    Raises MissingPlugins for a task without a plugin file, CheckpointError for a bad file.
    """
    from minidiff.plugin_files import find_plugins, load_plugin, load_selector
    from minidiff.loading import load_clip_vision, load_stable_diffusion
    found = find_plugins(plugins)
    missing = [os.path.join(plugins, t) for t in (tasks or []) if t not in found]
    if missing or not found:
        raise MissingPlugins(missing or [plugins])
    kw = dict(dtype=dtype, device=device)
    loaded = {t: load_plugin(found[t], t, **kw) for t in (tasks or found)}
    models = Models(load_stable_diffusion(sd, **kw), load_clip_vision(clip, **kw), loaded,
                    load_selector(selector, **kw) if selector else None)
    files = {"sd": sd, "clip": clip, **{f"plugin:{t}": found[t] for t in loaded}}
    return models, {**files, **({"selector": selector} if selector else {})}


def plan_inputs(src, out_dir, prompt=None, tasks=None, prompts_file=None):
    """Photos of `src` (a file or a folder's images) and {photo: instruction, or None with explicit tasks}.

    Without prompt and tasks, each photo's instruction comes from `prompts_file` (JSON {stem: instruction}),
    by default prompts.json in the input folder. Refuses (UsageError) an output folder that is the input
    folder, two photos with the same stem, and missing or blank instructions.
    """
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or folder")
    if os.fspath(out_dir).lower().endswith(IMAGE_SUFFIXES) and not os.path.isdir(out_dir):
        raise UsageError(f"output {out_dir}: give a folder; each photo's outputs are named after it")
    photos = list_images(src) if os.path.isdir(src) else [src]
    if not photos:
        raise UsageError(f"{src}: no image files (.png, .jpg, ...) in this folder")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in photos]
    if len(set(stems)) < len(stems):
        raise UsageError(f"{src}: two photos share a name ({stems}); their outputs would collide")
    in_dir = src if os.path.isdir(src) else (os.path.dirname(src) or ".")
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, in_dir):
        raise UsageError(f"output folder {out_dir} is the input folder: choose another (inputs stay intact)")
    if prompt is not None or tasks:
        if prompts_file:
            raise UsageError("a prompts file gives each photo its instruction: drop --prompt and --task")
        return photos, {p: prompt for p in photos}
    table = prompts_file or os.path.join(in_dir, "prompts.json")
    if not os.path.isfile(table):
        raise UsageError("say what to do: --prompt \"remove the rain\" (selector) or --task derain")
    try:
        with open(table, encoding="utf-8") as f:
            by_stem = json.load(f)
        prompts = {p: by_stem[s] for p, s in zip(photos, stems)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{table}: not a JSON object with an instruction per photo ({e!r})") from None
    if any(not isinstance(v, str) or not v.strip() for v in prompts.values()):
        raise UsageError(f"{table}: an instruction is empty or not a string")
    return photos, prompts


def run_photo(models, path, out_dir, *, prompt=None, tasks=None, steps=20, chain_steps=3, seed=42,
              threshold=0.0, max_side=DEFAULT_MAX_SIDE, dry_run=False, progress=True, record=None):
    """Restore one photo: select (prompt) or take `tasks`, resize, run the plugins, write the outputs.

    Writes <stem>.png (the result, at the processed size; the photo as loaded when no plugin applies),
    <stem>-compare.png (input | result) and <stem>.json, each atomically, the JSON last; with dry_run only
    the JSON. `record`: extra fields for the JSON (settings, hashes). Returns the record.
    """
    from minidiff.plugin import clip_features, restore
    from minidiff.selector import composite_tasks, select
    stem = os.path.splitext(os.path.basename(path))[0]
    clock = [time.perf_counter()]
    notes = []
    image = load_image(path, notes)
    feats = None  # CLIP features of the photo as loaded: computed once for the selector and the plugins
    if prompt is not None:  # the selector sees the photo as loaded, as demo.py
        feats = clip_features(models.clip_vision, image)
        tasks, scores = select(models.selector, models.sd, models.clip_vision, models.plugins, image, prompt,
                               threshold, features=feats)
    else:
        tasks, scores = list(tasks or []), None
    clock.append(time.perf_counter())
    if tasks:
        processed, resize = fit_size(image, max_side)
    else:
        processed, resize = image, "none: no plugin to apply, the photo comes back untouched"
    clock.append(time.perf_counter())
    fake = models is not None and models.fake  # models None: a dry run with explicit tasks needs none
    composite = composite_tasks(prompt, list(models.plugins))[1] if prompt is not None else None
    record = {"input": os.path.abspath(path), "prompt": prompt, "tasks": tasks, "scores": scores,
              "composite_matches": composite,
              "threshold": threshold if prompt is not None else None, "fake_weights": fake,
              **({"warning": FAKE_WARNING} if fake else {}), "dry_run": dry_run, "outputs": None,
              "input_size": list(image.size), "input_notes": notes, "processed_size": list(processed.size),
              "resize": resize, "max_side": max_side, "seed": seed, "steps": steps,
              "chain_steps": chain_steps, **(record or {})}
    if not dry_run:
        # CLIP sees the photo as loaded, every plugin the previous one's output (demo.py l.123, 177-251)
        result = image if not tasks else restore(
            models.sd, models.clip_vision, [models.plugins[t] for t in tasks], processed, steps=steps,
            chain_steps=chain_steps, seed=seed, progress=progress, clip_image=image, features=feats)
        clock.append(time.perf_counter())
        save_png_atomic(result, os.path.join(out_dir, stem + ".png"))
        save_png_atomic(side_by_side(image, result), os.path.join(out_dir, stem + "-compare.png"))
        record["outputs"] = {"result": stem + ".png", "compare": stem + "-compare.png"}
    names = ("select", "preprocess", "restore")
    record["timings_s"] = {n: round(b - a, 3) for n, a, b in zip(names, clock, clock[1:])}
    save_json_atomic(record, os.path.join(out_dir, stem + ".json"))
    return record
