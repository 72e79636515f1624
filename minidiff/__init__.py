"""minidiff: Stable Diffusion 1.5 and Diff-Plugin (CVPR 2024) in plain PyTorch.

The public names, each imported from the module that defines it. Importing the package imports torch and
the model code but loads no weights, no vocabulary (the tokenizer reads it when one is constructed) and
none of the reference libraries the tests compare with (tests/test_import.py checks all three).
"""
# Stable Diffusion 1.x and CLIP: loaders, networks, tokenizer, preprocessing
from minidiff.models.clip import CLIPTextModel, CLIPVisionModel, clip_preprocess
from minidiff.io.loading import load_clip_vision, load_stable_diffusion
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.models.unet import UNet, UNetConfig
from minidiff.models.vae import LATENT_SCALE, AutoencoderKL, VAEConfig
# samplers and the plain SD pipelines
from minidiff.diffusion.pipeline import img2img, txt2img
from minidiff.models.stable_diffusion import StableDiffusion
from minidiff.diffusion.schedulers import DDIMInverse, add_noise, make_sampler
# Diff-Plugin: the Task-Plugins, their files, the Plugin-Selector, photos in
from minidiff.io.imageio import load_image
from minidiff.plugin.plugin import TASKS, TaskPlugin, restore
from minidiff.plugin.files import load_plugin, load_selector, save_plugin, save_selector
from minidiff.plugin.selector import PluginSelector, select
# Training: the Task-Plugin objective (train.py's step) and the Plugin-Selector's Table 5 metrics
from minidiff.eval.selector_eval import selector_metrics
from minidiff.train.training import plugin_loss
# FID / KID
from minidiff.eval.metrics import frechet_distance, kernel_distance, load_feature_extractor

__all__ = [
    "CLIPTextModel", "CLIPVisionModel", "clip_preprocess", "load_clip_vision", "load_stable_diffusion",
    "CLIPTokenizer", "UNet", "UNetConfig", "LATENT_SCALE", "AutoencoderKL", "VAEConfig",
    "StableDiffusion", "img2img", "txt2img", "DDIMInverse", "add_noise", "make_sampler",
    "load_image", "TASKS", "TaskPlugin", "restore", "load_plugin", "load_selector", "save_plugin",
    "save_selector",
    "PluginSelector", "select", "selector_metrics", "plugin_loss",
    "frechet_distance", "kernel_distance", "load_feature_extractor",
]
