"""Tests of minidiff/diffusion/pipeline.py: txt2img and img2img against diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline on random tiny weights, plus fast checks of the image pre/post-processing.

Parity (@pytest.mark.parity, needs diffusers + transformers): one set of random tiny components (diffusers
UNet and VAE, transformers CLIP text model of vocabulary 49408) written in the ORIGINAL single-file layout by
tests/sd_layout.py and loaded by minidiff.load_stable_diffusion; diffusers runs the very same modules with
transformers' slow CLIPTokenizer built offline from open_clip's vocabulary (tests/test_tokenizer.py). Each
scheduler is diffusers' class from_config(SD-1.5 config) (UniPC with final_sigmas_type="sigma_min"), same
seed, CPU generator: pixel |diff| <= 2/255.
Run: python -m pytest tests/test_pipeline.py -q -s   (about 30 s)
"""
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import sd_layout
from minidiff.io.imageio import tensor_to_pil
from minidiff.diffusion.pipeline import preprocess
from test_schedulers import REFERENCE, SD15_SCHEDULER_CONFIG

# Random weights in fp32 on both sides; the latents agree to ~1e-5 (VAE/UNet summation order, UniPC/DPM alpha
# route, see test_schedulers), far below one uint8 level, so only a rounding boundary can flip a pixel by 1.
# 2/255 is the bound; the measured maximum is printed. This needs a random model that does not
# amplify float noise: see the UNet note in `components`.
PIXEL_TOL = 2
SIZE = 64  # pixels; latent 8x8 through a 4-level (x8) VAE
PHOTO = Path(__file__).resolve().parents[1] / "examples" / "chelsea-blur.jpg"  # public-domain test photo
TEXT_WIDTH = 64  # tiny CLIP text width = the UNet's cross-attention width; heads = width // 64 = 1


def test_preprocess_and_postprocess():
    img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 35, 3), dtype=np.uint8))
    x = preprocess(img)
    assert x.shape == (1, 3, 16, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    small = PIL.Image.fromarray(np.zeros((16, 24, 3), np.uint8) + 200)
    assert torch.allclose(preprocess(small), torch.full((1, 3, 16, 24), 200 / 255 * 2 - 1))  # no resize
    out = tensor_to_pil(torch.tensor([-2.0, -1.0, 0.0, 0.999, 3.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert np.asarray(out)[0, :, 0].tolist() == [0, 0, 128, 255, 255]  # clamp, then round(255 * (x/2 + .5))
    with pytest.raises(ValueError, match="smaller"):
        preprocess(PIL.Image.new("RGB", (5, 40)))


def test_tiny_pipelines_run_seeded():
    """minidiff alone (no reference library): sizes; same seed, same image; another seed, another image."""
    from dataclasses import replace
    from minidiff.models.clip import TINY_CLIP_TEXT, CLIPTextModel
    from minidiff.diffusion.pipeline import img2img, txt2img
    from minidiff.models.tokenizer import CLIPTokenizer
    from minidiff.models.unet import TINY_UNET, UNet
    from minidiff.models.vae import TINY_VAE, AutoencoderKL
    from minidiff.models.stable_diffusion import StableDiffusion
    torch.manual_seed(0)
    unet = UNet(replace(TINY_UNET, context_dim=TINY_CLIP_TEXT.width)).eval()
    text, vae = CLIPTextModel(TINY_CLIP_TEXT).eval(), AutoencoderKL(TINY_VAE).eval()
    sd = StableDiffusion(CLIPTokenizer(), text, unet, vae)
    a, b = (txt2img(sd, "a cat", steps=3, seed=s, height=16, width=24, scheduler="euler", progress=False)
            for s in (1, 1))
    assert a.size == (24, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    c, d = (img2img(sd, a, "a dog", strength=0.5, steps=4, seed=s, guidance=1.0, scheduler="unipc",
                    progress=False) for s in (2, 3))
    assert c.size == (24, 16) and not np.array_equal(np.asarray(c), np.asarray(d))


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """(minidiff StableDiffusion, diffusers pipeline kwargs) sharing one set of random tiny weights."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from test_tokenizer import _reference_tokenizer
    from test_unet import diffusers_unet
    from test_vae import diffusers_vae
    from minidiff import load_stable_diffusion
    tmp = tmp_path_factory.mktemp("tiny_sd")
    tokenizer = _reference_tokenizer(tmp)
    tokenizer.model_max_length = 77  # files-only construction leaves it unbounded; SD's tokenizer says 77
    torch.manual_seed(0)
    text_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=TEXT_WIDTH // 64,
                                           max_position_embeddings=77, hidden_act="quick_gelu",
                                           layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                                           pad_token_id=1)
    text_encoder = transformers.CLIPTextModel(text_cfg).eval()
    # Two UNet levels: the bottleneck stays >= 4x3 latent cells. (With SD's four levels an 8x6 latent shrinks
    # to 1x1, where GroupNorm normalises 2 numbers per group and a 1-ulp input change moves eps by 2e-5.)
    unet = diffusers_unet(seed=1, block_out_channels=(32, 64), cross_attention_dim=TEXT_WIDTH,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                          layers_per_block=1, sample_size=SIZE // 8)  # sample_size: img2img's init check
    vae = diffusers_vae((32, 32, 32, 32), 1, seed=2)
    path = sd_layout.write_original_single_file(tmp / "tiny-sd.safetensors", unet=unet, vae=vae,
                                                text_encoder=text_encoder)
    sd = load_stable_diffusion(str(path))
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    return sd, parts, diffusers


def reference_pipeline(components, name, img2img=False):
    _, parts, diffusers = components
    cls_name, overrides = REFERENCE[name]
    scheduler = getattr(diffusers, cls_name).from_config(SD15_SCHEDULER_CONFIG, **overrides)
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls(scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(mine, ref, what):
    a, b = np.asarray(mine, dtype=np.int16), np.asarray(ref, dtype=np.int16)
    assert a.shape == b.shape, f"{what}: {a.shape} vs {b.shape}"
    diff = np.abs(a - b)
    # saturated pixels would hide differences: the random model must give a real image
    assert 0.02 < (a.std() / 255) and ((a == 0) | (a == 255)).mean() < 0.5, f"{what}: degenerate image"
    print(f"PIXELS {what}: max|diff| {diff.max()}/255, mean {diff.mean():.4f}, "
          f"{(diff > 0).mean():.2%} differ")
    assert diff.max() <= PIXEL_TOL, f"{what}: max pixel diff {diff.max()} > {PIXEL_TOL}"


@pytest.mark.parity
@pytest.mark.parametrize("name,steps", [("ddim", 10), ("ddpm", 10), ("unipc", 10), ("dpmpp2m", 10),
                                        ("euler", 10), ("unipc", 3)])
def test_txt2img_matches_diffusers(components, name, steps):
    from minidiff.diffusion.pipeline import txt2img
    sd = components[0]
    prompt, seed = "a photo of a red car", 7
    with torch.no_grad():
        ref = reference_pipeline(components, name)(
            prompt, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(seed)).images[0]
    mine = txt2img(sd, prompt, steps=steps, guidance=7.5, scheduler=name, seed=seed, height=SIZE, width=SIZE,
                   progress=False)
    compare(mine, ref, f"txt2img {name} steps={steps}")


@pytest.mark.parity
@pytest.mark.parametrize("name,strength,guidance", [("ddim", 0.6, 7.5), ("ddpm", 0.5, 5.0),
                                                    ("unipc", 0.8, 7.5), ("dpmpp2m", 0.7, 7.5),
                                                    ("euler", 0.6, 1.0)])
def test_img2img_matches_diffusers(components, name, strength, guidance):
    """A 67x53 photo, rescaled to 64x48 by LANCZOS on both sides (minidiff's preprocessing must equal
    VaeImageProcessor's exactly); guidance 1.0 runs without the negative half."""
    from minidiff.diffusion.pipeline import img2img
    sd = components[0]
    photo = PIL.Image.open(PHOTO).convert("RGB").resize((67, 53), PIL.Image.BICUBIC)
    prompt, seed, steps = "a cat, oil painting", 3, 10
    pipe = reference_pipeline(components, name, img2img=True)
    proc = pipe.image_processor
    assert torch.equal(proc.preprocess(photo), preprocess(photo))  # [1, 3, 48, 64] in [-1, 1]
    with torch.no_grad():
        ref = pipe(prompt, image=photo, strength=strength, num_inference_steps=steps,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(seed)).images[0]
    mine = img2img(sd, photo, prompt, strength=strength, steps=steps, guidance=guidance, scheduler=name,
                   seed=seed, progress=False)
    assert mine.size == (64, 48)
    compare(mine, ref, f"img2img {name} strength={strength} guidance={guidance}")


@pytest.mark.parity
def test_negative_prompt_and_bad_arguments(components):
    from minidiff.diffusion.pipeline import img2img, txt2img
    sd = components[0]
    with torch.no_grad():
        ref = reference_pipeline(components, "ddim")(
            "a house", negative_prompt="blurry, low quality", height=SIZE, width=SIZE + 16,
            num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0]
    mine = txt2img(sd, "a house", negative_prompt="blurry, low quality", steps=4, seed=1, height=SIZE,
                   width=SIZE + 16, progress=False)
    compare(mine, ref, "txt2img negative prompt 64x80")
    with pytest.raises(ValueError, match="multiples"):
        txt2img(sd, "x", height=60, progress=False)
    with pytest.raises(ValueError, match="no step"):
        img2img(sd, mine, "x", strength=0.05, steps=10, progress=False)
