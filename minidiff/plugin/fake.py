"""Random tiny models with matching widths, for trying the tools without weight files and for tests.

`fake_models` builds what minidiff.plugin.restoration.Models holds (SD 1.x parts, CLIP vision, Task-Plugins, the
Plugin-Selector) at test sizes (the TINY_* presets of each model file), seeded, on any device and dtype. The
images they make mean nothing; tools that use them say so (FAKE_WARNING).

    models = fake_models(["derain", "dehaze"])          # what tools/sample.py --fake-weights runs
    models = with_files(fake_models([]), {"deblur": "run/deblur.safetensors"})  # a plugin trained on them
"""
from dataclasses import replace

import torch

from minidiff.models.clip import TINY_CLIP_TEXT, TINY_CLIP_VISION, CLIPTextModel, CLIPVisionModel
from minidiff.io.loading import StableDiffusion
from minidiff.errors import PluginMismatchError
from minidiff.plugin.files import load_plugin, load_selector
from minidiff.plugin.plugin import SCB, TINY_PLUGIN, TPB, TaskPlugin, check_fits
from minidiff.plugin.restoration import Models
from minidiff.plugin.selector import PluginSelector
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.models.unet import TINY_UNET, UNet
from minidiff.models.vae import TINY_VAE, AutoencoderKL

FAKE_WARNING = "FAKE WEIGHTS: random tiny models, the images mean nothing (for trying the tools and tests)"


def fake_models(tasks, with_selector=True, device="cpu", dtype=torch.float32, seed=0):
    """Random tiny models with matching widths (no files): SD, CLIP vision, one plugin per task, a selector.

    Seeded, so the same call gives the same weights. Widths: text = UNet context = TPB output = selector
    = 128; the VAE keeps 4 levels so that latents are 1/8 of the image, as in SD.
    """
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


def with_files(models, plugins=None, selector=None, dtype=torch.float32, device="cpu"):
    """`models` (fake_models) with plugin files ({task: path}) and a selector file loaded over the random
    ones: a plugin trained by tools/train.py --fake-weights runs on the same seeded base. A file whose widths
    do not fit the tiny models raises PluginMismatchError (one line); an unreadable one CheckpointError."""
    loaded = {t: load_plugin(path, t, dtype=dtype, device=device) for t, path in (plugins or {}).items()}
    for plugin in loaded.values():
        check_fits(models.sd, models.clip_vision, plugin)
        plugin.requires_grad_(False)
    if selector is not None:
        sel = load_selector(selector, dtype=dtype, device=device).eval().requires_grad_(False)
        width = models.sd.unet.cfg.context_dim  # pooled text and max-pooled TPB tokens both have this width
        if sel.proj_v.in_features != width:
            raise PluginMismatchError(f"selector {selector} does not fit these models: its width "
                                      f"{sel.proj_v.in_features} != {width} (the tiny text encoder's)")
        models.selector = sel
    models.plugins = {**models.plugins, **loaded}
    return models
