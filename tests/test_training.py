"""minidiff.train.training: the Task-Plugin training step on tiny random networks (CPU, seconds).

Covers: plugin_loss recomputed by hand from its parts, its draws (generator, per-sample seeds independent
of how a batch is split), gradients only on TPB/SCB, gradient checkpointing (same loss and gradients),
--scb-init unet, and learning: a few synthetic deblur pairs, the loss falls by an asserted margin within
100 steps while the frozen networks stay bit-identical. The parity test against diffusers + transformers
is tests/test_training_parity.py.  Run: python -m pytest tests/test_training.py -q
"""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minidiff.train import training
from minidiff.models.clip import TINY_CLIP_VISION, CLIPVisionModel
from minidiff.plugin.plugin import SCB, TINY_PLUGIN, TPB, TaskPlugin
from minidiff.diffusion.schedulers import add_noise
from minidiff.models.unet import TINY_UNET, UNet
from minidiff.models.vae import LATENT_SCALE, TINY_VAE, AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")
R = 32  # image side: latents 4x4


def tiny_models(seed=0, out_gain=1.0):
    """Frozen tiny SD parts + CLIP vision and a fresh plugin (train mode). out_gain scales the UNet's last
    conv: a frozen denoiser whose random output is far from the noise, which the plugin must correct."""
    torch.manual_seed(seed)
    unet = UNet(replace(TINY_UNET, channel_mult=(1, 2), attention_levels=(0, 1), heads=2))
    vae = AutoencoderKL(replace(TINY_VAE, ch_mult=(1, 1, 1, 1)))  # 4 levels: latents are 1/8 of the image
    clip = CLIPVisionModel(replace(TINY_CLIP_VISION, layers=2))
    with torch.no_grad():
        unet.out[-1].weight.mul_(out_gain)
        unet.out[-1].bias.mul_(out_gain)
    for net in (unet, vae, clip):
        net.eval().requires_grad_(False)
    cfg = replace(TINY_PLUGIN, clip_dim=clip.cfg.width)
    plugin = TaskPlugin("deblur", TPB(cfg), SCB(cfg)).train().requires_grad_(True)
    return SimpleNamespace(unet=unet, vae=vae), clip, plugin


def deblur_pairs(n, seed=0):
    """(degraded, clean) [n, 3, R, R]: random clean images and their 5x5 box-blurred copies."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 3, R, R, generator=g) * 2 - 1
    return F.avg_pool2d(F.pad(clean, (2, 2, 2, 2), mode="reflect"), 5, 1), clean


def test_plugin_loss_is_the_official_formula():
    sd, clip, plugin = tiny_models()
    degraded, clean = deblur_pairs(2)
    latent_noise, noise, t = training.draw_noise(2, (4, R // 8, R // 8), torch.Generator().manual_seed(1))
    loss = training.plugin_loss(sd, clip, plugin, degraded, clean, noise=noise, timesteps=t,
                                latent_noise=latent_noise)
    with torch.no_grad():  # by hand, from the formula in the module docstring
        mean, logvar = sd.vae.encode(clean)
        noisy = add_noise((mean + (0.5 * logvar).exp() * latent_noise) * LATENT_SCALE, noise, t)
        pixels = F.interpolate((degraded + 1) / 2, size=(224, 224), mode="bilinear", align_corners=False)
        pixels = (pixels - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / \
            torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        ctx = plugin.tpb(clip(pixels).hidden_states[-1][:, 1:])
        res = plugin.scb(LATENT_SCALE * sd.vae.encode(degraded)[0], t, ctx)
        eps = sd.unet(noisy, t, ctx, skip_residuals=dict(enumerate(res)))
    assert loss.dtype == torch.float32 and loss.item() == ((eps - noise) ** 2).mean().item()


def test_draws_are_deterministic_and_split_independent():
    sd, clip, plugin = tiny_models()
    degraded, clean = deblur_pairs(2)
    a = training.plugin_loss(sd, clip, plugin, degraded, clean, generator=torch.Generator().manual_seed(5))
    b = training.plugin_loss(sd, clip, plugin, degraded, clean, generator=torch.Generator().manual_seed(5))
    c = training.plugin_loss(sd, clip, plugin, degraded, clean, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() != c.item()
    whole = training.sample_draws(3, 7, [0, 1, 2, 3], (4, 2, 2))
    parts = [training.sample_draws(3, 7, idx, (4, 2, 2)) for idx in ([0], [1, 2], [3])]
    for k in range(3):
        assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))
    assert not torch.equal(whole[0], training.sample_draws(3, 8, [0, 1, 2, 3], (4, 2, 2))[0])
    assert int(whole[2].min()) >= 0 and int(whole[2].max()) < 1000


def test_gradients_reach_only_the_plugin_and_checkpointing_changes_nothing():
    sd, clip, plugin = tiny_models()
    degraded, clean = deblur_pairs(2)
    gen = torch.Generator().manual_seed(2)
    draws = training.draw_noise(2, (4, R // 8, R // 8), gen)
    loss = training.plugin_loss(sd, clip, plugin, degraded, clean, latent_noise=draws[0], noise=draws[1],
                                timesteps=draws[2])
    loss.backward()
    grads = {k: p.grad.clone() for k, p in plugin.named_parameters()}
    for k, g in grads.items():  # zero convs start at zero: nothing reaches the SCB behind them yet
        inner = k.startswith("scb.") and not k.startswith("scb.zero_convs")
        assert (g.abs().sum() == 0) if inner else (g.abs().sum() > 0), k
    assert all(p.grad is None for net in (sd.unet, sd.vae, clip) for p in net.parameters())
    plugin.zero_grad()
    training.enable_grad_checkpointing(sd.unet)
    again = training.plugin_loss(sd, clip, plugin, degraded, clean, latent_noise=draws[0], noise=draws[1],
                                 timesteps=draws[2])
    again.backward()
    assert again.item() == loss.item()
    for k, p in plugin.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-8)


def test_scb_init_from_unet_copies_the_first_level():
    sd, _, plugin = tiny_models()
    training.init_scb_from_unet(plugin.scb, sd.unet)
    unet = sd.unet.state_dict()
    for k, v in plugin.scb.state_dict().items():
        assert torch.equal(v, torch.zeros_like(v) if k.startswith("zero_convs") else unet[k]), k
    no_attention = UNet(replace(TINY_UNET, attention_levels=(1, 2)))
    with pytest.raises(ValueError, match="scb-init unet"):
        training.init_scb_from_unet(plugin.scb, no_attention)


def test_loss_falls_and_frozen_networks_stay_bit_identical():
    sd, clip, plugin = tiny_models(out_gain=4.0)
    frozen = {name: {k: v.clone() for k, v in net.state_dict().items()}
              for name, net in (("unet", sd.unet), ("vae", sd.vae), ("clip", clip))}
    degraded, clean = deblur_pairs(8)
    optimizer = training.make_optimizer(plugin, 1e-3)  # the official 1e-5 is for full-size networks
    losses = []
    for step in range(1, 101):
        idx = list(range(4 * (step % 2), 4 * (step % 2) + 4))
        ln, noise, t = training.sample_draws(0, step, idx, (4, R // 8, R // 8))
        loss = training.plugin_loss(sd, clip, plugin, degraded[idx], clean[idx], noise=noise, timesteps=t,
                                    latent_noise=ln)
        loss.backward()
        norms = training.clip_and_step(plugin, optimizer)
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"mean loss, steps 1-20: {first:.3f}, steps 81-100: {last:.3f}, last grad norms {norms}")
    assert last < 0.6 * first  # measured: 2.48 -> 1.25
    for name, net in (("unet", sd.unet), ("vae", sd.vae), ("clip", clip)):
        assert all(torch.equal(v, frozen[name][k]) for k, v in net.state_dict().items()), name
