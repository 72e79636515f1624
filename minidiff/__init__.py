"""minidiff: Stable Diffusion 1.5 and Diff-Plugin (CVPR 2024) in plain PyTorch.

Importing the package loads no weights, no vocabulary and no optional dependency: the public names below
are resolved on first use from the module that defines them.
"""
import importlib

# public name -> module that defines it
_EXPORTS = {
    "load_stable_diffusion": "weights",
    "load_clip_vision": "weights",
    "build_clip_text": "weights",
    "StableDiffusion": "weights",
    "CLIPTokenizer": "tokenizer",
    "CLIPTextModel": "clip",
    "CLIPVisionModel": "clip",
    "clip_preprocess": "clip",
    "UNet": "unet",
    "UNetConfig": "unet",
    "unet_from_diffusers": "weights",
    "AutoencoderKL": "vae",
    "VAEConfig": "vae",
    "LATENT_SCALE": "vae",
    "make_sampler": "schedulers",
    "DDIMInverse": "schedulers",
    "alphas_cumprod": "schedulers",
    "add_noise": "schedulers",
    "txt2img": "pipeline",
    "img2img": "pipeline",
    "build_vae": "weights",
    "vae_from_diffusers": "weights",
    "TPB": "plugin",
    "SCB": "plugin",
    "TaskPlugin": "plugin",
    "TASKS": "plugin",
    "load_plugin": "plugin",
    "save_plugin": "plugin",
    "find_plugins": "plugin",
    "official_resize": "plugin",
    "restore": "plugin",
    "PluginSelector": "selector",
    "load_selector": "selector",
    "save_selector": "selector",
    "select": "selector",
    "COMPOSITE": "selector",
    "FIDInception": "inception",
    "load_inception": "inception",
    "load_feature_extractor": "metrics",
    "frechet_distance": "metrics",
    "kernel_distance": "metrics",
    "load_image": "imageio",
    "ImageError": "imageio",
    "fit_size": "imageio",
    "side_by_side": "imageio",
    "fake_models": "runner",
    "load_models": "runner",
    "run_photo": "runner",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minidiff' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minidiff.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
