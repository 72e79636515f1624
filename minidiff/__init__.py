"""minidiff: Stable Diffusion 1.5 and Diff-Plugin (CVPR 2024) in plain PyTorch.

Importing the package loads no weights, no vocabulary and no optional dependency: the public names below
are resolved on first use from the module that defines them.
"""
import importlib

# public name -> module that defines it
_EXPORTS = {
    # Stable Diffusion 1.x and CLIP: loaders, networks, tokenizer, preprocessing
    "load_stable_diffusion": "loading",
    "load_clip_vision": "loading",
    "StableDiffusion": "loading",
    "CLIPTokenizer": "tokenizer",
    "CLIPTextModel": "clip",
    "CLIPVisionModel": "clip",
    "clip_preprocess": "clip",
    "UNet": "unet",
    "UNetConfig": "unet",
    "AutoencoderKL": "vae",
    "VAEConfig": "vae",
    "LATENT_SCALE": "vae",
    # samplers and the plain SD pipelines
    "make_sampler": "schedulers",
    "DDIMInverse": "schedulers",
    "add_noise": "schedulers",
    "txt2img": "pipeline",
    "img2img": "pipeline",
    # Diff-Plugin
    "TASKS": "plugin",
    "TaskPlugin": "plugin",
    "load_plugin": "plugin_files",
    "save_plugin": "plugin_files",
    "restore": "plugin",
    "PluginSelector": "selector",
    "load_selector": "plugin_files",
    "select": "selector",
    "load_image": "imageio",
    "save_selector": "plugin_files",
    # FID / KID
    "load_feature_extractor": "metrics",
    "frechet_distance": "metrics",
    "kernel_distance": "metrics",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minidiff' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minidiff.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
