"""The small model family: SD 1.x's architectures at reduced widths, trained from nothing on a CPU.

The published SD + CLIP weights are ~6 GB that a newcomer does not have on the first day. This file holds
what minidiff needs to train its own small stand-ins, stage by stage (tools/train_small.py runs them):

    photos (short side 256)  --random 64 px crops-->  VAE        (L1 + image-gradient L1 + small KL)
    photos  --random 128 px crops--> VAE posterior  -> latents   (and the latent scale = 1 / std, as SD's)
    instructions (the corpus's training part)  -->  CLIP text tower: names the tasks in its pooled embedding
    latents  -->  UNet: epsilon prediction on SD's DDPM schedule, context = the text tower's "" (SD's null)
    CLIP vision tower: random, seeded (not trained; the TPB learns on top)
    Task-Plugins (tools/train.py --degrade TASK) and the Plugin-Selector (tools/train_selector.py)

Every network is the SD-1.x / CLIP class minidiff already has; only the widths shrink, so the files load
with the ordinary loaders (minidiff.io.loading infers every width from the tensor shapes). GroupNorm keeps
32 groups and the UNet 8 heads (the loaders' fixed SD values), so every width is a multiple of 32.

Why the null context: a Task-Plugin replaces the UNet's cross-attention context by its TPB tokens. The
UNet is pre-trained, as SD is on its 10% of dropped captions, on the one context the family's text tower
gives for the empty prompt: its cross-attention weights are then trained on a real tower's output (not
zeros, which would leave them untouched), it stays an unconditional model for plain sampling (the
pipeline's "" prompt is exactly that context), and the TPB learns to steer it from there.

Why the text tower is trained: the selector reads the pooled embedding of an instruction through a linear
head. A random 64-wide tower washes the words out: a linear probe on its pooled embeddings names the task of
47% of the corpus's held-out sentences (77% of the training ones), so the selector cannot learn. The text
stage trains the tower (with a linear task head, then dropped) to name the tasks of the training sentences
and of random multi-task combinations of them, as real CLIP's pooled embedding names what a caption says.
The words stage then teaches it words no training sentence uses: WordNet's words for each task's concepts
(minidiff/data/task_words.json, tools/task_words.py) swapped into the training sentences, while an anchor
holds the tower's output for "" (the UNet's context) where it was.
"""
import json
import os
import random
import re
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from minidiff.diffusion.schedulers import NUM_TRAIN_TIMESTEPS, add_noise
from minidiff.models.clip import CLIP_TEXT_L14, CLIP_VISION_L14, CLIPTextModel, CLIPVisionModel
from minidiff.models.unet import UNet, UNetConfig
from minidiff.models.vae import AutoencoderKL, VAEConfig
from minidiff.plugin.plugin import PluginConfig
from minidiff.train import rundir, runlog
from minidiff.train.datasets import to_training_tensor
from minidiff.train.instructions import combine
from minidiff.train.seeding import generator_for

# ------------------------------------------------------------------------------------------- the family
# Sized from measured CPU step times (README "Train the whole stack on a laptop"); widths multiples of 32.
SIZE = 128  # working resolution: 128 x 128 photos -> 16 x 16 latents
VAE_CROP = 64  # the VAE is convolutional: it trains on 64 px crops and runs on any multiple of 8
SMALL_VAE = replace(VAEConfig(), ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1)  # f = 8, 4 latent channels
# text width = UNet context = TPB output; level 0 at 64 wide (the SCB's width), attention on levels 1-2 only
SMALL_TEXT = replace(CLIP_TEXT_L14, width=64, layers=2, heads=1, mlp=256)
SMALL_VISION = replace(CLIP_VISION_L14, image_size=112, patch_size=14, width=64, layers=4, heads=1, mlp=256,
                       projection=None)  # 8 x 8 = 64 patch tokens for the TPB
SMALL_UNET = replace(UNetConfig(), model_channels=64, channel_mult=(1, 1, 2), attention_levels=(1, 2),
                     context_dim=SMALL_TEXT.width)
SMALL_PLUGIN = replace(PluginConfig(), clip_dim=SMALL_VISION.width, context_dim=SMALL_TEXT.width,
                       channels=SMALL_UNET.model_channels)
QUICK_TASKS = ("deblur", "lowlight")  # the plugins of tools/train_small.py --quick (CI-sized)
TOWER_SEED = 1234  # the random CLIP towers: torch.manual_seed(TOWER_SEED + k) before building tower k

# KL weight of the VAE loss: small, as SD's first stage (1e-6 there, beside its perceptual + GAN terms),
# enough to keep the posterior's log-variance finite and the latent scale meaningful
KL_WEIGHT = 1e-6
GRAD_WEIGHT = 0.5  # weight of the L1 on horizontal/vertical image differences (edges: against blur)


def random_towers():
    """The family's CLIP text and vision towers, random and seeded, in eval mode: the vision tower as shipped,
    the text tower as the text stage's starting point."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TOWER_SEED)
        text = CLIPTextModel(SMALL_TEXT)
        torch.manual_seed(TOWER_SEED + 1)
        vision = CLIPVisionModel(SMALL_VISION)
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)


def trained_text_tower(path):
    """The text stage's tower from its file (eval, frozen)."""
    text = CLIPTextModel(SMALL_TEXT)
    return load_net(text, path).requires_grad_(False)


def new_vae(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(SMALL_VAE)


def new_unet(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(SMALL_UNET)


# ----------------------------------------------------------------------------------------------- data
def random_crop(image, size, gen):
    """A size x size crop at a position drawn from `gen` (a torch.Generator), flipped with p 0.5 ->
    [3, size, size] in [-1, 1]. image: PIL RGB with both sides >= size."""
    w, h = image.size
    left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    crop = image.crop((left, top, left + size, top + size))
    if torch.rand((), generator=gen) < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return to_training_tensor(crop)


def crop_batch(photos, numbers, size, seed):
    """Global sample numbers -> [B, 3, size, size]: sample n takes photo n % len(photos), a crop seeded by
    (seed, n); so a batch is a pure function of its numbers (exact resume)."""
    return torch.stack([random_crop(photos[n % len(photos)], size, generator_for(seed, "crop", n))
                        for n in numbers])


def load_photos(paths, min_side):
    """PIL RGB photos, each scaled up (bicubic) if its short side is under `min_side`."""
    photos = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        if min(im.size) < min_side:
            k = min_side / min(im.size)
            im = im.resize((max(min_side, round(im.width * k)), max(min_side, round(im.height * k))),
                           Image.BICUBIC)
        photos.append(im)
    return photos


# ----------------------------------------------------------------------------------------- the VAE step
def vae_batch(photos, numbers, size, seed):
    """Crops [B, 3, size, size] and posterior noises [B, 4, size/8, size/8] of the global sample numbers."""
    noise = [torch.randn((4, size // 8, size // 8), generator=generator_for(seed, "vae", n)) for n in numbers]
    return crop_batch(photos, numbers, size, seed), torch.stack(noise)


def image_differences(x):
    """Horizontal and vertical differences of images [B, 3, H, W] (the gradient term's input)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae, images, noise):
    """Reconstruction loss of a batch: L1 + GRAD_WEIGHT * L1 of image differences + KL_WEIGHT * KL.

    images [B, 3, H, W] in [-1, 1]; noise [B, 4, H/8, W/8] for the posterior sample. Returns (loss, parts)."""
    mean, logvar = vae.encode(images)  # 2 x [B, 4, H/8, W/8]
    z = mean + torch.exp(0.5 * logvar) * noise  # posterior sample
    recon = vae.decode(z)  # [B, 3, H, W]
    l1 = (recon - images).abs().mean()
    (rx, ry), (ix, iy) = image_differences(recon), image_differences(images)
    grad = (rx - ix).abs().mean() + (ry - iy).abs().mean()
    # KL(q(z|x) || N(0, I)), summed over the latent, mean over the batch (CompVis DiagonalGaussian.kl)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    loss = l1 + GRAD_WEIGHT * grad + KL_WEIGHT * kl
    return loss, {"l1": l1.item(), "grad": grad.item(), "kl": kl.item()}


@torch.no_grad()
def psnr(a, b):
    """PSNR in dB of images in [-1, 1] (data range 2), per batch element -> [B]."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


# ------------------------------------------------------------------------------------ latents and scale
@torch.no_grad()
def encode_crops(vae, photos, per_photo, size, seed, batch=32):
    """Posterior mean and log-variance of `per_photo` random crops of every photo -> 2 x [N, 4, s/8, s/8]."""
    numbers = list(range(per_photo * len(photos)))
    means, logvars = [], []
    for k in range(0, len(numbers), batch):
        m, lv = vae.encode(crop_batch(photos, numbers[k:k + batch], size, seed))
        means.append(m)
        logvars.append(lv)
    return torch.cat(means), torch.cat(logvars)


def latent_scale(mean, logvar, seed):
    """SD's rule for its 0.18215: 1 / std of posterior samples of the training data (one draw each)."""
    noise = torch.randn(mean.shape, generator=generator_for(seed, "scale"))
    return float(1.0 / (mean + torch.exp(0.5 * logvar) * noise).std())


# ----------------------------------------------------------------------------------------- the UNet step
def ldm_loss(unet, mean, logvar, scale, context, numbers, seed, step):
    """SD's training loss on pre-encoded latents: a posterior sample x scale, noised at a random t on the
    DDPM schedule, epsilon predicted (MSE). Draws seeded by (seed, step, sample number).

    mean, logvar: [B, 4, h, w]; context [1, 77, width] (the null context, broadcast over the batch)."""
    gens = [generator_for(seed, "ldm", step, n) for n in numbers]
    post = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])  # [B, 4, h, w]
    noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
    t = torch.cat([torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g) for g in gens])  # [B]
    latents = scale * (mean + torch.exp(0.5 * logvar) * post)
    eps = unet(add_noise(latents, noise, t), t, context.expand(len(numbers), -1, -1))
    return F.mse_loss(eps, noise)


# ------------------------------------------------------------------------------------- the text tower
class TaskNamer(nn.Module):
    """The text stage's network: the text tower and a linear head from its pooled embedding to one logit
    per task. Only the tower is kept; the head makes the pooled embedding say which tasks a sentence asks."""

    def __init__(self, text, tasks):
        super().__init__()
        self.text = text
        self.head = nn.Linear(text.cfg.width, len(tasks))

    def forward(self, ids):
        """ids [B, 77] -> task logits [B, tasks]."""
        return self.head(self.text(ids)[1])


def text_examples(corpus, seed, combinations=1000):
    """(sentences, multi-hot task labels [N, tasks]) of one part of the instruction corpus: every sentence
    (irrelevant ones label no task) and `combinations` random multi-task requests (instructions.combine)."""
    texts = corpus.labelled() + combine(corpus, combinations, seed)
    labels = torch.tensor([[float(t in ts) for t in corpus.tasks] for _, ts in texts])  # [N, tasks]
    return [text for text, _ in texts], labels


TOKEN_NOISE = 0.15  # share of a training sentence's word tokens replaced by random ones (typos, new words)


def corrupt_tokens(ids, gen, share=TOKEN_NOISE):
    """ids [B, 77] with `share` of the word tokens (not start/end/padding) replaced by random vocabulary ids:
    the tower learns from the sentence around a word it does not know, as it must for unseen misspellings."""
    vocab_words = 49406  # ids 0 .. 49405; 49406 = <|startoftext|>, 49407 = <|endoftext|> and padding
    words = ids < vocab_words
    hit = words & (torch.rand(ids.shape, generator=gen) < share)
    return torch.where(hit, torch.randint(0, vocab_words, ids.shape, generator=gen), ids)


def text_loss(namer, ids, labels, numbers, seed, step):
    """Multi-label task naming (binary cross-entropy per task) on a batch drawn by (seed, step), its word
    tokens corrupted (corrupt_tokens): ids [N, 77] and labels [N, tasks] of every example, `numbers` how many
    to draw -> (loss, {"exact": share of the batch whose whole task set is right})."""
    gen = generator_for(seed, "text", step)
    pick = torch.randint(0, len(ids), (numbers,), generator=gen)
    logits = namer(corrupt_tokens(ids[pick], gen))  # [B, tasks]
    loss = F.binary_cross_entropy_with_logits(logits, labels[pick])
    exact = ((logits > 0).float() == labels[pick]).all(dim=1).float().mean()  # whole task set right
    return loss, {"exact": round(float(exact), 4)}


# ------------------------------------------------------------------------------ the words stage
TASK_WORDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "task_words.json")
WORD_SWAP = 0.5  # chance that a task word of a training sentence is swapped for another word of its task
NULL_ANCHOR = 10.0  # weight of the MSE that holds the empty prompt's output (the UNet's context) in place


def load_task_words(path=TASK_WORDS):
    """{task: [word]} of tools/task_words.py (WordNet's words for each task's concepts)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)["words"]


def swap_task_words(text, tasks, words, rng, share=WORD_SWAP):
    """`text` with each word of its tasks' word lists swapped, with chance `share`, for a random word of the
    same list (rng: random.Random): "remove the rain" -> "remove the downpour". Whole words, any case."""
    for task in tasks:
        pool = words.get(task, [])
        if not pool:
            continue
        pattern = r"\b(" + "|".join(re.escape(w) for w in sorted(pool, key=len, reverse=True)) + r")\b"
        text = re.sub(pattern, lambda m: rng.choice(pool) if rng.random() < share else m.group(0), text,
                      flags=re.IGNORECASE)
    return text


def words_loss(namer, sentences, labels, tasks, words, tokenizer, numbers, seed, step, null_target):
    """The words stage's batch: `numbers` examples drawn by (seed, step), their task words swapped
    (swap_task_words), word tokens corrupted as in text_loss; binary cross-entropy per task plus NULL_ANCHOR x
    the MSE between the tower's output for "" and `null_target` [1, 77, width] (what the UNet was trained
    on). sentences [N], labels [N, tasks] -> (loss, {"exact", "anchor"})."""
    gen = generator_for(seed, "words", step)
    rng = random.Random(int(torch.randint(0, 2**62, (), generator=gen)))
    pick = torch.randint(0, len(sentences), (numbers,), generator=gen).tolist()
    named = [[t for t, v in zip(tasks, labels[i].tolist()) if v] for i in pick]
    ids = tokenizer([swap_task_words(sentences[i], ts, words, rng) for i, ts in zip(pick, named)])
    logits = namer(corrupt_tokens(ids, gen))  # [B, tasks]
    target = labels[torch.tensor(pick)]
    anchor = (namer.text(tokenizer([""]))[0] - null_target).pow(2).mean()
    loss = F.binary_cross_entropy_with_logits(logits, target) + NULL_ANCHOR * anchor
    exact = ((logits > 0).float() == target).all(dim=1).float().mean()
    return loss, {"exact": round(float(exact), 4), "anchor": float(anchor.detach())}


@torch.no_grad()
def task_naming_accuracy(namer, ids, labels):
    """Share of sentences whose task set the namer gets exactly right (logit > 0 <=> task named)."""
    namer.eval()
    return float(((namer(ids) > 0).float() == labels).all(dim=1).float().mean())


def to_tensor_square(image, size):
    """PIL photo -> its centre square, resized to size x size (bicubic) -> [3, size, size] in [-1, 1]."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return to_training_tensor(image.crop(box).resize((size, size), Image.BICUBIC))


def pairs_sheet(pairs):
    """[(left, right)] PIL images of one size -> one sheet, a row per pair."""
    w, h = pairs[0][0].size
    sheet = Image.new("RGB", (2 * w, h * len(pairs)), "white")
    for k, (a, b) in enumerate(pairs):
        sheet.paste(a, (0, k * h))
        sheet.paste(b, (w, k * h))
    return sheet


def to_uint8(x):
    """[3, H, W] in [-1, 1] -> PIL RGB."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


# ------------------------------------------------------------------------------ one stage = one training run
def fit(run, net, batch_loss, *, steps, lr, every, dist, fields=("step", "loss"), desc="train", decay=False):
    """The training loop of the VAE and UNet stages, on minidiff.train's run folder (rundir) and log (runlog):
    AdamW at a constant lr (decay=True: falling linearly to 0 at the last step), a checkpoint every `every`
    steps (weights, optimizer, RNG) from which --resume continues bit-identically (the batches are pure
    functions of the step), log.csv, loss.png, a progress bar.

    run: a started rundir.RunDir; batch_loss(step) -> (scalar loss tensor, {log field: number})."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    ckpt = run.load_checkpoint(run.latest_checkpoint()) if run.resume else None
    start = 0 if ckpt is None else ckpt.step
    if ckpt is not None:
        net.load_state_dict(ckpt.tensors)
        optimizer.load_state_dict(ckpt.optimizer["adamw"])
    net.train()
    log = runlog.CsvLog(run.path / "log.csv", list(fields), start, dist)
    bar = runlog.progress(steps, start, dist, desc=desc)
    for step in range(start + 1, steps + 1):
        if decay:  # a function of the step alone, so a resumed run sets the same lr
            optimizer.param_groups[0]["lr"] = lr * (steps - step + 1) / steps
        loss, parts = batch_loss(step)
        rundir.check_finite(loss.detach(), step, run)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.write({"step": step, "loss": loss.item(), **parts})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % every == 0 or step == steps:
            run.save_checkpoint(step, net.state_dict(), {"adamw": optimizer.state_dict()}, step, keep=2)
    bar.close()
    log.close()
    runlog.plot_loss(run.path / "log.csv", run.path / "loss.png")
    return net.eval()


# ------------------------------------------------------------------------------------------ files
def save_net(net, path):
    """A stage's finished network: its state dict, fp32, written atomically."""
    from safetensors.torch import save_file
    from minidiff.io.files import atomic_write
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_net(net, path):
    """The state dict of `path` into `net` (strict) -> net in eval mode."""
    from safetensors.torch import load_file
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def load_latents(path):
    """latents.safetensors -> (mean [N, 4, h, w], logvar [N, 4, h, w], latent scale)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("mean"), f.get_tensor("logvar"), float(f.metadata()["latent_scale"])


@torch.no_grad()
def null_context(text):
    """The text tower's last hidden state for the empty prompt: [1, 77, width] (SD's unconditional)."""
    from minidiff.models.tokenizer import CLIPTokenizer
    ids = CLIPTokenizer()([""])  # [1, 77]
    return text(ids)[0]


def save_sd_file(text, unet, vae, scale, path, dtype=torch.float32):
    """One SD-1.x single file (CompVis names: model.diffusion_model., first_stage_model.,
    cond_stage_model.transformer.) with the latent scale in its metadata: minidiff.io.loading reads it."""
    from safetensors.torch import save_file
    from minidiff.io.files import atomic_write
    state = {}
    for prefix, net in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                        ("cond_stage_model.transformer.", text)):
        state.update({prefix + k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()})
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "minidiff-small",
                                                                   "latent_scale": repr(float(scale))}))


def save_vision_file(vision, path, dtype=torch.float32):
    """The CLIP vision tower with Hugging Face names (vision_model.*), as load_clip_vision reads them."""
    from safetensors.torch import save_file
    from minidiff.io.files import atomic_write
    state = {k: v.detach().to(dtype).contiguous() for k, v in vision.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "minidiff-small"}))


def copy_half(src, dest):
    """A safetensors file with its floating tensors in fp16 (metadata kept): the shipped form."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from minidiff.io.files import atomic_write
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: (t.half() if t.is_floating_point() else t) for k in f.keys() for t in [f.get_tensor(k)]}
    atomic_write(dest, lambda tmp: save_file(state, tmp, metadata=meta))
