"""Batched restoration for tools/sample.py --batch N: up to N photos of one processed size through the VAE, the
SCB and the UNet together.

Each photo gets the noise it gets alone: one CPU generator per photo, seeded with the photo's seed, draws its
[1, 4, h, w] noise, and the draws are stacked, so a batch of N is N single runs side by side. Only the kernels
differ (a batch of N can sum in another order), so results agree with unbatched ones to within about 1/255, not
bit for bit (tests/test_batch.py). The loop is minidiff.plugin.plugin.run_plugin's (infer.py l.108-160) with a
batch dimension; the photos are grouped by processed size (a batch needs one latent shape) in the order given.
With --task every photo runs the same plugins; with --prompt the selector chooses per photo, so a batch groups
photos whose size and chosen plugins agree. This helper module of the scripts beside it is not a script.
"""
import dataclasses
import time

import torch

from minidiff.errors import NonFiniteError
from minidiff.io.imageio import load_image, pil_to_tensor, resize_photo, tensor_to_pil, to_multiple_of_8
from minidiff.diffusion.schedulers import add_noise, make_sampler
from minidiff.plugin.plugin import PURE_NOISE_TASKS, RENOISE_FROM, check_fits, clip_features, denoise_step
from minidiff.plugin.restoration import restore_photo


@torch.no_grad()
def run_plugin_batch(sd, plugin, feats, images, steps, seed):
    """One plugin pass on a batch: feats [B, 256, D] (per photo), images: B PIL photos of one size -> B PIL."""
    p = next(sd.unet.parameters())
    context = plugin.tpb(feats.to(p.device, p.dtype))  # [B, 256, 768]
    pixels = torch.cat([pil_to_tensor(im) for im in images]).to(p.device, p.dtype)  # [B, 3, H, W]
    mean, _ = sd.vae.encode(pixels)
    cond = sd.vae.cfg.latent_scale * mean  # [B, 4, H/8, W/8]
    shape = (1,) + tuple(cond.shape[1:])
    # one CPU generator per photo, seeded as a lone run seeds it: the same noise as unbatched
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for _ in images])
    noise = noise.to(p.device, p.dtype)  # [B, 4, H/8, W/8]
    pure = plugin.task in PURE_NOISE_TASKS
    sampler = make_sampler("unipc", steps)
    on_device = sampler.timesteps.to(p.device)
    x = noise
    for i, t in enumerate(sampler.timesteps):
        if not pure and t >= RENOISE_FROM:
            x = add_noise(cond, noise, t)
        eps = denoise_step(sd.unet, plugin.scb, x, on_device[i], cond, context)  # [B, 4, H/8, W/8]
        x = sampler.step(eps, i, x)
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"plugin {plugin.task!r}: the latent is not finite after step {i + 1} of "
                                 f"{len(sampler.timesteps)} (t={int(t)}) in a batch of {len(images)}")
    decoded = sd.vae.decode(x / sd.vae.cfg.latent_scale)  # [B, 3, H, W]
    return [tensor_to_pil(decoded[b:b + 1]) for b in range(len(images))]


def plan_batches(items, batch):
    """Lists of at most `batch` items sharing one key, in the order the keys first appear:
    items are (key, value) pairs."""
    groups = {}
    for key, value in items:
        groups.setdefault(key, []).append(value)
    return [vals[i:i + batch] for vals in groups.values() for i in range(0, len(vals), batch)]


def restore_batched(models, paths, prompts, batch, *, seed, steps, chain_steps, resize, short_side, max_side,
                    **kw):
    """{path: (image as loaded, input notes, Restored)} for `paths`, restored `batch` at a time.

    Every photo is planned alone first (restore_photo(dry_run=True): selection, size rule, notes), then the
    photos of one processed size and plugin list run together, plugin after plugin as restore() chains them.
    """
    planned = {}
    for path in paths:
        notes = []
        image = load_image(path, notes)
        dry = restore_photo(models, image, prompt=prompts[path], seed=seed, steps=steps, chain_steps=chain_steps,
                            resize=resize, short_side=short_side, max_side=max_side, dry_run=True,
                            progress=False, **kw)
        planned[path] = (image, notes, dry)
    keys = [((tuple(d.size), tuple(d.tasks)), p) for p, (_, _, d) in planned.items()]
    out = {}
    for group in plan_batches(keys, batch):
        t0 = time.perf_counter()
        dry = planned[group[0]][2]
        images = []
        for path in group:
            image, _, d = planned[path]
            resized, _ = resize_photo(image, d.rule, short_side, max_side, *([kw["model_side"]] if "model_side" in kw else []))
            images.append(to_multiple_of_8(resized.convert("RGB")) if d.tasks else resized)
        if dry.tasks:
            plugins = [models.plugins[t] for t in dry.tasks]
            for plugin in plugins:
                check_fits(models.sd, models.clip_vision, plugin)
            feats = torch.cat([clip_features(models.clip_vision, planned[p][0]) for p in group])  # original photos
            for k, plugin in enumerate(plugins):
                images = run_plugin_batch(models.sd, plugin, feats, images, steps if k == 0 else dry.chain_steps,
                                          seed)
        seconds = round((time.perf_counter() - t0) / len(group), 3)
        for path, result in zip(group, images):
            image, notes, d = planned[path]
            timings = {**d.timings, "restore": seconds, "batch": len(group)}
            out[path] = (image, notes, dataclasses.replace(d, image=result, timings=timings))
    return out
