"""One photo through Diff-Plugin end to end, in the official demo's order: select, resize, restore.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024).
Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, demo.py `process` l.103-253 (scores on the photo as loaded,
then the resize rule, then the selected plugins chained, each on the previous result and every one after the
first with 3 steps; when only the null entry is selected the demo returns the resized photo, l.185-187) and
infer.py l.84-160 (one plugin named by the user, its own resize rule). The pieces live elsewhere: scoring in
minidiff.plugin.selector, the sampling loop in minidiff.plugin.plugin, the size rules in minidiff.io.imageio. This file puts
them in that order (`restore_photo`) and loads the models they need from files (`load_models`).

    models, files = load_models("checkpoints/stable-diffusion-v1-4", "checkpoints/clip-vit-large-patch14",
                                "checkpoints/diff-plugin", selector="checkpoints/.../PromptTunner.pt")
    out = restore_photo(models, load_image("photo.jpg"), prompt="please remove the rain")
    out.image.save("restored.png"); print(out.tasks, out.scores, out.resize)
"""
import os
import time
from dataclasses import dataclass, field

import torch

from minidiff.errors import MissingPlugins  # noqa: F401 (raised here, imported from here)
from minidiff.io.imageio import DEFAULT_MAX_SIDE, OFFICIAL_SHORT_SIDE, check_min_side, resize_photo
from minidiff.io.loading import load_clip_vision, load_stable_diffusion
from minidiff.plugin.plugin import check_fits, clip_features, restore
from minidiff.plugin.files import find_plugins, load_plugin, load_selector
from minidiff.models.prepack import prepack_convs, return_freed_memory
from minidiff.plugin.selector import chosen_by_scores, composite_tasks, select

# A rule upscaling the short side more than this many times gets a warning: the result is mostly invented.
BIG_UPSCALE = 4


@dataclass
class Models:
    """What restoration runs: SD 1.x parts, CLIP ViT-L/14 vision, {task: TaskPlugin}, the selector."""
    sd: object
    clip_vision: torch.nn.Module
    plugins: dict
    selector: torch.nn.Module | None
    fake: bool = False


def load_models(sd, clip, plugins, tasks=None, selector=None, dtype=torch.float32, device="cpu",
                text_encoder=None):
    """Models from files, and {name: path} of every file used (for hashes).

    plugins: a folder (official <task>/ folders or <task>.safetensors); tasks: the plugins to load (default:
    all found, which the selector needs); selector: its file, or None when no selection is wanted.
    text_encoder: load SD's text encoder (default: only with a selector, the one part that reads text).
    Raises MissingPlugins for a task without a plugin file, CheckpointError for a bad file.
    """
    found = find_plugins(plugins)
    missing = [os.path.join(plugins, t) for t in (tasks or []) if t not in found]
    if missing or not found:
        raise MissingPlugins(missing or [plugins])
    kw = dict(dtype=dtype, device=device)
    loaded = {t: load_plugin(found[t], t, **kw) for t in (tasks or found)}  # small: a bad one fails first
    text_encoder = bool(selector) if text_encoder is None else text_encoder
    sd_parts = load_stable_diffusion(sd, text_encoder=text_encoder, **kw)
    # CPU inference: 3x3 conv kernels packed once for oneDNN (no-op on the GPU), before CLIP is read, so
    # that packing's transient copies and the plain kernels it frees do not add to the loaded tower
    for net in (sd_parts.unet, sd_parts.vae, *(p.scb for p in loaded.values())):
        prepack_convs(net)
    return_freed_memory()
    models = Models(sd_parts, load_clip_vision(clip, **kw), loaded,
                    load_selector(selector, **kw) if selector else None)
    files = {"sd": sd, "clip": clip, **{f"plugin:{t}": found[t] for t in loaded}}
    return models, {**files, **({"selector": selector} if selector else {})}


@dataclass
class Restored:
    """What restore_photo did. `image` is None for a dry run."""
    image: object  # PIL: the restored photo, or the resized photo when no plugin applies (as demo.py)
    size: tuple  # (width, height) of `image`: multiples of 8 after plugins, the resized size without
    tasks: list  # plugins applied, in order
    scores: dict | None  # raw selector scores incl. "null"; None with explicit tasks
    by_table: list = field(default_factory=list)  # tasks that only the composite table added
    composite_matches: list = field(default_factory=list)  # the table's patterns the prompt matched
    rule: str = ""  # the size rule applied: "demo" or "infer"
    resize: str = ""  # what the size rule did, one line
    chain_steps: int = 0  # steps of every plugin after the first, as run
    warnings: list = field(default_factory=list)  # silent changes worth a line: truncation, big rescale
    timings: dict = field(default_factory=dict)  # seconds: select, preprocess, restore


def prompt_warning(tokenizer, prompt):
    """A warning when CLIP reads only the start of `prompt` (77 tokens with start and end), else None."""
    n, keep = len(tokenizer.encode(prompt)), tokenizer.context_length - 2
    if n <= keep:
        return None
    return f"the instruction is {n} tokens long; CLIP reads the first {keep} (the rest is ignored)"


def restore_photo(models, image, *, prompt=None, tasks=None, resize=None, short_side=OFFICIAL_SHORT_SIDE,
                  max_side=DEFAULT_MAX_SIDE, steps=20, chain_steps=3, seed=42, threshold=0.0, composite=None,
                  dry_run=False, progress=True, model_side=OFFICIAL_SHORT_SIDE, release_clip=False):
    """Restore one photo (PIL RGB, as loaded) as the official demo does; returns a Restored.

    prompt: the selector chooses the plugins (demo.py); tasks: the plugins to run, in that order (infer.py;
    give one or the other). resize: "demo" (short side always `short_side`) or "infer" (raised to 512 when
    below), default the rule of the official script that matches: demo with a prompt, infer with tasks;
    `max_side` caps the long side (0: no cap, as official); `model_side`: the model's working short side (512
    for SD 1.5; the infer rule raises to it). Later plugins run min(chain_steps, steps) steps.
    composite: a composite table (selector.load_composite; default selector.COMPOSITE, [] for none).
    dry_run: selection and sizes only (no plugin runs; with explicit tasks `models` may be None).
    release_clip: the last photo of a run: once its CLIP features are made, `models.clip_vision` is set to
    None (ViT-L/14's 1.1 GiB in fp32 is free before the UNet runs; the next photo would need it loaded again).
    Raises ImageError when a side would end under MIN_SIDE.
    """
    if (prompt is None) == (not tasks):
        raise ValueError("give a prompt (the selector chooses) or tasks (you choose), one of them")
    rule = resize or ("demo" if prompt is not None else "infer")
    clock, warnings = [time.perf_counter()], []
    feats, scores, by_table, matches = None, None, [], []
    if prompt is not None:  # the selector and every TPB see the photo as loaded (demo.py l.123)
        feats = clip_features(models.clip_vision, image)
        names = list(models.plugins)
        tasks, scores = select(models.selector, models.sd, models.clip_vision, models.plugins, image, prompt,
                               threshold, features=feats, composite=composite)
        by_table = [t for t in tasks if t not in chosen_by_scores(scores, threshold)]
        matches = composite_tasks(prompt, names, composite)[1]
        warnings.append(prompt_warning(models.sd.tokenizer, prompt))
    tasks = list(tasks)
    clock.append(time.perf_counter())
    # the one size rule (imageio.photo_size): demo.py l.166-173 / infer.py l.96-107, the cap, the model's size
    resized, note = resize_photo(image, rule, short_side, max_side, model_side)
    w, h = resized.size
    check_min_side((w - w % 8, h - h % 8))
    size = (w - w % 8, h - h % 8) if tasks else (w, h)  # the plugins run at multiples of 8
    if "capped" in note:
        warnings.append(note)
    if min(resized.size) > BIG_UPSCALE * min(image.size):
        warnings.append(f"a {image.size[0]}x{image.size[1]} photo upscaled "
                        f"{min(resized.size) / min(image.size):.0f}x: the result is made from very little")
    clock.append(time.perf_counter())
    chain = min(chain_steps, steps)  # a quick try (--steps 2) stays quick when plugins chain
    if release_clip and tasks and not dry_run:
        for t in tasks:
            check_fits(models.sd, models.clip_vision, models.plugins[t])  # while the tower is there to ask
        feats = feats if feats is not None else clip_features(models.clip_vision, image)  # [1, 256, clip_dim]
        models.clip_vision = None
        return_freed_memory()
    result = None
    if not dry_run:
        # no plugin selected (only null): the resized photo, as demo.py l.185-187 returns `image`
        result = resized if not tasks else restore(
            models.sd, models.clip_vision, [models.plugins[t] for t in tasks], resized, steps=steps,
            chain_steps=chain, seed=seed, progress=progress, clip_image=image, features=feats)
        clock.append(time.perf_counter())
    timings = {n: round(b - a, 3) for n, a, b in zip(("select", "preprocess", "restore"), clock, clock[1:])}
    return Restored(result, tuple(size), tasks, scores, by_table, matches, rule, note, chain,
                    [w for w in warnings if w], timings)
