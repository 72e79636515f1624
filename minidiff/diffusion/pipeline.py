"""Plain Stable Diffusion 1.x sampling: text-to-image and img2img with classifier-free guidance.

prompt -> CLIP text embeddings (negative prompt and prompt in one batch) -> denoising loop of a sampler
from schedulers.py, eps = eps_uncond + guidance * (eps_text - eps_uncond) -> VAE decode -> PIL image.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022);
classifier-free guidance: Ho & Salimans 2022; img2img ("SDEdit"): Meng et al. 2022. Mirrors diffusers v0.35.2
src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py (StableDiffusionPipeline),
pipeline_stable_diffusion_img2img.py (StableDiffusionImg2ImgPipeline) and src/diffusers/image_processor.py
(VaeImageProcessor), including how they seed: ONE CPU torch.Generator(seed) supplies every random draw, in
the pipelines' order (img2img: the VAE posterior sample, then the noise; DDPM: then one draw per step). So
the same seed and weights give diffusers' image (tests/test_pipeline.py: within 2/255, random tiny weights).
"""
import PIL.Image
import torch
from tqdm.auto import tqdm

from minidiff.models.stable_diffusion import StableDiffusion  # noqa: F401  (the bundle the pipelines take)
from minidiff.io.imageio import pil_to_tensor, tensor_to_pil
from minidiff.diffusion.schedulers import make_sampler, randn_tensor


def vae_scale_factor(vae):
    """Pixels per latent cell: 2 ** (number of VAE levels - 1), 8 for SD (diffusers' vae_scale_factor)."""
    return 2 ** (len(vae.cfg.ch_mult) - 1)


@torch.no_grad()
def encode_prompt(sd, prompt, negative_prompt=""):
    """Cross-attention context [2, 77, width]: row 0 the negative ("unconditional") prompt, row 1 the prompt.

    The last hidden state after the final LayerNorm (SD 1.x's context), no attention mask, as diffusers does.
    """
    device = next(sd.text_encoder.parameters()).device
    ids = sd.tokenizer([negative_prompt, prompt]).to(device)  # [2, 77]
    hidden, _ = sd.text_encoder(ids)  # [2, 77, width]
    return hidden


def preprocess(image, multiple=8):
    """PIL image -> [1, 3, H, W] in [-1, 1], each side floored to a multiple of `multiple` by a LANCZOS
    resize (a rescale, not a crop), as VaeImageProcessor.preprocess. Returned contiguous (diffusers keeps the
    permuted HWC array, channels_last in memory: same values, other conv/GroupNorm summation orders)."""
    image = image.convert("RGB")
    w, h = (side - side % multiple for side in image.size)
    if w == 0 or h == 0:
        raise ValueError(f"image {image.size[0]}x{image.size[1]} is smaller than {multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=PIL.Image.LANCZOS)
    return pil_to_tensor(image)  # [1, 3, H, W]


@torch.no_grad()
def denoise(sd, sampler, latents, context, guidance, generator=None, start=0, progress=True):
    """Run `sampler` from timestep index `start` to the end with classifier-free guidance.

    context [2, N, C] = (negative prompt, prompt). With guidance <= 1 diffusers skips the unconditional half
    (one UNet row per step, eps = eps_text); so does this loop.
    """
    cfg = guidance > 1.0
    if not cfg:
        context = context[1:]  # [1, N, C]: the prompt only
    for i in tqdm(range(start, len(sampler.timesteps)), disable=not progress, desc="sampling", unit="step"):
        t = sampler.timesteps[i]
        x = torch.cat([latents] * 2) if cfg else latents  # [2 or 1, 4, h, w]: one UNet batch for both halves
        eps = sd.unet(sampler.scale_model_input(x, i), t, context)
        if cfg:
            eps_uncond, eps_text = eps.chunk(2)  # 2 x [1, 4, h, w]
            eps = eps_uncond + guidance * (eps_text - eps_uncond)  # push away from the negative prompt
        latents = sampler.step(eps, i, latents, generator=generator)
    return latents


def _unet_dtype_device(sd):
    p = next(sd.unet.parameters())
    return p.dtype, p.device


@torch.no_grad()
def decode(sd, latents):
    """SD latents -> PIL image (first of the batch): undo the latent scale, VAE-decode, to 8-bit RGB."""
    return tensor_to_pil(sd.vae.decode(latents / sd.vae.cfg.latent_scale))


@torch.no_grad()
def txt2img(sd, prompt, *, negative_prompt="", steps=50, guidance=7.5, scheduler="ddim", seed=0, height=512,
            width=512, progress=True):
    """Text-to-image: what diffusers' StableDiffusionPipeline gives for the same seed (CPU generator)."""
    f = vae_scale_factor(sd.vae)
    if height % f or width % f or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
    dtype, device = _unet_dtype_device(sd)
    sampler = make_sampler(scheduler, steps)
    generator = torch.Generator().manual_seed(seed)
    context = encode_prompt(sd, prompt, negative_prompt).to(dtype)
    # The start latent: unit noise scaled to the sampler's first noise level (1 except for Euler).
    shape = (1, sd.unet.cfg.in_channels, height // f, width // f)
    latents = randn_tensor(shape, generator, dtype, device) * sampler.init_noise_sigma
    latents = denoise(sd, sampler, latents, context, guidance, generator, 0, progress)
    return decode(sd, latents)


@torch.no_grad()
def img2img(sd, image, prompt, *, strength=0.8, negative_prompt="", steps=50, guidance=7.5, scheduler="ddim",
            seed=0, progress=True):
    """img2img (SDEdit): noise the photo's latent `strength` of the way up, then denoise from there.

    Of `steps` timesteps only the last int(steps * strength) run (diffusers' get_timesteps). The image is
    rescaled to multiples of 8 (LANCZOS); its latent is a SAMPLE of the VAE posterior, mean + std * noise,
    drawn first from the seed's generator, then the forward-process noise. Same image as
    StableDiffusionImg2ImgPipeline.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    run = min(int(steps * strength), steps)  # number of steps that actually run
    if run < 1:
        raise ValueError(f"strength {strength} x steps {steps} leaves no step to run; raise one of them")
    start = steps - run
    dtype, device = _unet_dtype_device(sd)
    sampler = make_sampler(scheduler, steps)
    generator = torch.Generator().manual_seed(seed)
    context = encode_prompt(sd, prompt, negative_prompt).to(dtype)
    x = preprocess(image, vae_scale_factor(sd.vae)).to(device=device, dtype=dtype)
    mean, logvar = sd.vae.encode(x)  # posterior of the photo, each [1, 4, h, w]
    z = mean + torch.exp(0.5 * logvar) * randn_tensor(mean.shape, generator, dtype, device)  # a sample
    x0 = sd.vae.cfg.latent_scale * z
    noise = randn_tensor(x0.shape, generator, dtype, device)
    latents = sampler.add_noise_at(x0, noise, start)  # x_t at t = timesteps[start]
    latents = denoise(sd, sampler, latents, context, guidance, generator, start, progress)
    return decode(sd, latents)
