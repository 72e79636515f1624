"""Training a Diff-Plugin Task-Plugin: the official training step as one function, `plugin_loss`, and the
pieces around it (seeded per-sample draws, AdamW with separate gradient clipping, SCB initialisation,
gradient checkpointing of the frozen UNet).

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024),
sec. 3.3 and 4.1. Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, train.py l.150-189 (models, optimizer)
and l.313-367 (one step). Only TPB and SCB learn; the VAE, UNet and CLIP vision tower are frozen.

One step, for a degraded photo y and its clean version x (both [B, 3, H, W] in [-1, 1]):
    z0    = s * (mu(x) + sigma(x) * latent_noise)           VAE posterior SAMPLE of the clean photo
    z_t   = sqrt(acp_t) z0 + sqrt(1 - acp_t) noise          DDPM forward process, t ~ U{0..999}
    ctx   = TPB(CLIP((y + 1)/2 -> 224x224 bilinear -> OpenAI mean/std).hidden_states[-1][:, 1:])
    res   = SCB(s * mu(y), t, ctx)                           posterior MEAN of the degraded photo
    loss  = mean((UNet(z_t, t, ctx, skips + res) - noise)^2)
with s the VAE's latent scale (sd.vae.cfg.latent_scale: 0.18215 for SD 1.x, the small family its own).
The CLIP input differs from inference (clip_preprocess: bicubic short side + centre crop): that mismatch is
in the official code and kept. Unlike the official code, CLIP runs without gradients (it is not trained).
"""
import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minidiff.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from minidiff.diffusion.schedulers import NUM_TRAIN_TIMESTEPS, add_noise
from minidiff.train.seeding import generator_for
from minidiff.train.trainer import all_reduce_mean

CLIP_TRAIN_SIZE = 224  # train.py l.330: F.interpolate(size=(224, 224)), ViT-L/14's input size
# train.py l.58-70 defaults: AdamW betas, weight decay, eps; max_grad_norm (clipped per network, l.357-358)
ADAM_BETAS, WEIGHT_DECAY, ADAM_EPS, MAX_GRAD_NORM = (0.9, 0.999), 1e-2, 1e-8, 1.0


def draw_noise(batch, latent_shape, generator):
    """(latent_noise, noise, timesteps) for `batch` samples, in the official order of draws (posterior
    sample, then randn_like, then randint): [B, *latent_shape] x 2 and LongTensor [B], on the CPU."""
    latent_noise = torch.randn((batch, *latent_shape), generator=generator)
    noise = torch.randn((batch, *latent_shape), generator=generator)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    return latent_noise, noise, timesteps


def sample_draws(seed, step, indices, latent_shape):
    """Per-sample draws of update `step` for the global sample numbers `indices`: each sample has its own
    generator seeded by (seed, step, index), so a global batch gets the same draws however it is split
    over processes and micro-batches. Returns (latent_noise, noise, timesteps) as draw_noise."""
    draws = [draw_noise(1, latent_shape, generator_for(seed, "draws", step, n)) for n in indices]
    return tuple(torch.cat(parts) for parts in zip(*draws))


def clip_train_input(degraded, size=CLIP_TRAIN_SIZE):
    """train.py l.327-335: [B, 3, H, W] in [-1, 1] -> CLIP pixels [B, 3, 224, 224]: (x + 1) / 2, bilinear
    resize without antialias or crop (the aspect ratio is not kept), then OpenAI's mean/std."""
    x = (degraded + 1.0) / 2.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def plugin_loss(sd, clip_vision, plugin, degraded, clean, *, noise=None, timesteps=None, latent_noise=None,
                generator=None):
    """The official training loss of one batch (train.py l.313-367): a scalar float32 tensor.

    degraded, clean: [B, 3, H, W] in [-1, 1]. noise, latent_noise: [B, 4, H/8, W/8]; timesteps: LongTensor
    [B] in [0, 1000). Any of the three left out is drawn, all three with draw_noise(generator) (on the CPU;
    generator None = torch's global one). The frozen networks run in their own dtype; the plugin runs in
    its own (fp32 master weights), with the TPB tokens and SCB residuals cast to the UNet's dtype. Modes and
    requires_grad are the caller's business: gradients reach only what requires them through the UNet.
    """
    p = next(sd.unet.parameters())
    dev, dtype = p.device, p.dtype  # the frozen networks' device and dtype
    q = next(plugin.parameters())
    degraded, clean = degraded.to(dev, dtype), clean.to(dev, dtype)
    with torch.no_grad():
        mean, logvar = sd.vae.encode(clean)  # 2 x [B, 4, h, w]
        if noise is None or timesteps is None or latent_noise is None:
            drawn = draw_noise(clean.shape[0], mean.shape[1:], generator)
            latent_noise = drawn[0] if latent_noise is None else latent_noise
            noise = drawn[1] if noise is None else noise
            timesteps = drawn[2] if timesteps is None else timesteps
        latent_noise, noise = latent_noise.to(dev, dtype), noise.to(dev, dtype)
        timesteps = timesteps.to(dev)
        latents = (mean + torch.exp(0.5 * logvar) * latent_noise) * sd.vae.cfg.latent_scale  # posterior sample, scaled
        noisy = add_noise(latents, noise, timesteps)  # [B, 4, h, w]: z_t on SD's DDPM schedule
        c = next(clip_vision.parameters())
        size = getattr(getattr(clip_vision, "cfg", None), "image_size", CLIP_TRAIN_SIZE)  # the tower's input side
        hidden = clip_vision(clip_train_input(degraded.to(c.device, c.dtype), size)).hidden_states
        feats = hidden[-1][:, 1:]  # [B, 256, clip_dim]: last layer, before the post-LN, CLS dropped
        cond = sd.vae.cfg.latent_scale * sd.vae.encode(degraded)[0]  # [B, 4, h, w]: posterior MEAN of the input
    context = plugin.tpb(feats.to(q.device, q.dtype))  # [B, 256, context_dim], in the plugin's dtype
    residuals = plugin.scb(cond.to(q.dtype), timesteps, context)  # 3 x [B, C, h, w]
    skips = {i: r.to(dtype) for i, r in enumerate(residuals)}  # added to the UNet's skips 0, 1, 2
    eps = sd.unet(noisy, timesteps, context.to(dtype), skip_residuals=skips)  # [B, 4, h, w]
    return F.mse_loss(eps.float(), noise.float())  # epsilon prediction (SD 1.x), mean over everything


class PluginObjective(nn.Module):
    """plugin_loss as a module whose only parameters are the plugin's: what DDP wraps. The frozen networks
    sit in a plain tuple, so they are neither registered, broadcast nor synchronised."""

    def __init__(self, sd, clip_vision, plugin):
        super().__init__()
        self.plugin = plugin
        self.frozen = (sd, clip_vision)

    def forward(self, degraded, clean, latent_noise, noise, timesteps):
        sd, clip_vision = self.frozen
        return plugin_loss(sd, clip_vision, self.plugin, degraded, clean, noise=noise, timesteps=timesteps,
                           latent_noise=latent_noise)


def accumulate_gradients(model, micro_batches, seed, step, latent_shape, dist, scaler=None):
    """Forward + backward of update `step` over this rank's micro-batches [(degraded, clean, sample numbers)]
    -> the loss of the whole global batch (mean over ranks; the same tensor on every rank).

    model: PluginObjective, DDP-wrapped under torchrun (gradients averaged over ranks on the last
    micro-batch only: no_sync before). Each micro-batch loss is divided by their count, so the gradient is
    that of the global-batch mean whatever the split. Draws come from sample_draws(seed, step, numbers).
    """
    total = torch.zeros((), device=dist.device)
    for k, (degraded, clean, numbers) in enumerate(micro_batches):
        draws = sample_draws(seed, step, numbers.tolist(), latent_shape)
        last = k == len(micro_batches) - 1
        with model.no_sync() if dist.world_size > 1 and not last else contextlib.nullcontext():
            loss = model(degraded, clean, *draws) / len(micro_batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    return all_reduce_mean(total, dist)


def make_optimizer(plugin, lr):
    """AdamW over SCB then TPB (two parameter groups, one lr), with the official hyper-parameters."""
    groups = [{"params": list(plugin.scb.parameters())}, {"params": list(plugin.tpb.parameters())}]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)


def clip_and_step(plugin, optimizer, scaler=None):
    """Clip the gradient norm to 1.0 for SCB and for TPB separately (train.py l.357-358), step, zero the
    gradients. scaler: a GradScaler (fp16), unscaled first. Returns the two norms before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm_scb = torch.nn.utils.clip_grad_norm_(plugin.scb.parameters(), MAX_GRAD_NORM)
    norm_tpb = torch.nn.utils.clip_grad_norm_(plugin.tpb.parameters(), MAX_GRAD_NORM)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm_scb), float(norm_tpb)


def init_scb_from_unet(scb, unet):
    """ControlNet's initialisation (the official `--load_weights_from_unet`, which crashes as released):
    the SCB's time embedding and two (ResBlock, attention) layers copied from the UNet's first level, and
    its condition conv from the UNet's conv_in (both read a 4-channel SD latent). Zero convs stay zero."""
    theirs = unet.state_dict()
    wanted = {k: v for k, v in scb.state_dict().items() if not k.startswith("zero_convs.")}
    missing = [k for k, v in wanted.items() if k not in theirs or theirs[k].shape != v.shape]
    if missing:
        raise ValueError(f"--scb-init unet: the UNet has no matching {missing[0]} (and {len(missing) - 1} "
                         "more); its first level must be SD's (320 channels with attention)")
    scb.load_state_dict({k: theirs[k] for k in wanted}, strict=False)


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_grad_checkpointing(unet):
    """Recompute each UNet block's activations in the backward pass instead of keeping them (the frozen
    UNet's activations are most of a step's memory, since the gradient flows back through all of it to
    the SCB residuals and the TPB context). Patches the blocks' forward; parameters and outputs unchanged."""
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        block.forward = functools.partial(_checkpointed, block.forward)


def psnr(a, b):
    """PSNR in dB of two same-size 8-bit PIL images (capped at 100 dB for identical images)."""
    import numpy as np
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0 ** 2 / mse))


@torch.no_grad()
def validation_sheet(sd, clip_vision, plugin, pairs, steps, seed):
    """Run minidiff's inference loop (plugin.restore) on held-out pairs [(input PIL, gt PIL)] ->
    (one PIL sheet, a row `input | output | gt` per pair captioned with its PSNR, mean PSNR of the outputs).
    The plugin runs as a copy in the frozen networks' dtype (restore feeds it their activations)."""
    import copy
    from PIL import Image, ImageDraw
    from minidiff.plugin.plugin import restore
    p = next(sd.unet.parameters())
    runner = copy.deepcopy(plugin).to(p.device, p.dtype).eval()
    rows, scores = [], []
    for inp, gt in pairs:
        out = restore(sd, clip_vision, [runner], inp, steps=steps, seed=seed, progress=False)
        gt = gt.resize(out.size, Image.BICUBIC) if gt.size != out.size else gt
        scores.append(psnr(out, gt))
        w, h = out.size
        row = Image.new("RGB", (3 * w, h + 14), "white")
        for k, im in enumerate((inp.resize(out.size), out, gt)):
            row.paste(im, (k * w, 14))
        ImageDraw.Draw(row).text((2, 1), f"input | output | gt   PSNR {scores[-1]:.2f} dB", fill="black")
        rows.append(row)
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for k, row in enumerate(rows):
        sheet.paste(row, (0, k * row.height))
    return sheet, sum(scores) / len(scores)


@torch.no_grad()
def photo_sheet(sd, clip_vision, plugin, paths, resolution, steps, seed):
    """The official `--validation_image`: photos without ground truth, each resized to the training square
    and restored as in validation_sheet -> one PIL sheet, a row `input | output` per photo."""
    import copy
    from PIL import Image, ImageDraw
    from minidiff.io.imageio import load_image
    from minidiff.plugin.plugin import restore
    p = next(sd.unet.parameters())
    runner = copy.deepcopy(plugin).to(p.device, p.dtype).eval()
    rows = []
    for path in paths:
        inp = load_image(path).resize((resolution, resolution), Image.BILINEAR)
        out = restore(sd, clip_vision, [runner], inp, steps=steps, seed=seed, progress=False)
        w, h = out.size
        row = Image.new("RGB", (2 * w, h + 14), "white")
        row.paste(inp.resize(out.size), (0, 14))
        row.paste(out, (w, 14))
        ImageDraw.Draw(row).text((2, 1), "input | output", fill="black")
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    return sheet
