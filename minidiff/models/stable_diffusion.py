"""The Stable Diffusion 1.x bundle: the four networks of one checkpoint, held together.

It lives with the networks (the lowest layer) so that the loaders (minidiff.io.loading) build it and the
pipelines (minidiff.diffusion.pipeline) and the Diff-Plugin code take it, without either reaching up.
"""
from dataclasses import dataclass

import torch


@dataclass
class StableDiffusion:
    """The four parts of an SD 1.x checkpoint: ids = tokenizer(texts); hidden, pooled = text_encoder(ids);
    eps = unet(latents, t, hidden); vae.encode / vae.decode. loading.load_stable_diffusion builds one
    (text_encoder None when loaded without it: restoration and plugin training never read text)."""
    tokenizer: object
    text_encoder: torch.nn.Module | None
    unet: torch.nn.Module
    vae: torch.nn.Module
