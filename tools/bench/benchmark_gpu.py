#!/usr/bin/env python
"""GPU speed of the Diff-Plugin restore: minidiff against the official loop on diffusers, eager and compiled.

    python tools/bench/benchmark_gpu.py --json gpu.json                # CUDA: 512 then 1024, fp16 and bf16
    python tools/bench/benchmark_gpu.py --tiny --device cpu --sizes 64 --steps 3 --runs 1   # the code paths, CPU

One restore = one plugin as infer.py runs it: CLIP ViT-L/14 features, TPB, VAE encode, `--steps` UniPC steps
of SCB + UNet, VAE decode. Four variants on the same random full-size weights (drawn once in diffusers' UNet
and VAE, transformers' CLIP vision and the official TPB/SCB of tests/official_oracle.py, then converted into
minidiff's models): minidiff eager (restore()), minidiff compiled (restore(compile=True): SCB + UNet as one
torch.compile graph, static shapes, CUDA graphs), diffusers eager (the official loop) and diffusers compiled
(the same loop, its SCB + UNet call compiled with the same settings); then photos/s of minidiff eager at
each --batches size (tools/sample.py --batch's loop, one plugin). Per row: latency (median of --runs
restores after one warm-up, which compiles: first_s), it/s = (steps - 1) / (latency - latency of a 1-step
restore) (the denoising loop alone: CLIP, TPB and the VAE cancel), peak GPU memory of the variant's runs
(warm-up included) above what was allocated before them (weights, earlier rows' CUDA graph pools),
and the largest difference in 8-bit levels from minidiff's fp32 eager image. Rows go most wanted first (512:
fp16's 4 variants, then bf16's; then 1024): each is printed (flushed) and --json rewritten as it comes, so a
run cut short keeps what it measured. Needs diffusers and transformers (the test extras). Not yet run on a
GPU: its time there is an estimate, 6-10 min on an H200, mostly the 8 compiles (2 libraries x 2 dtypes x 2
sizes, static shapes), each reported as first_s; --sizes / --dtypes / --variants run a part.
"""
import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "tools")]  # tests/: the oracle
import official_oracle as oracle  # noqa: E402
from _batch import run_plugin_batch  # noqa: E402  (tools/sample.py --batch's loop)
from minidiff.models.clip import CLIP_VISION_L14, CLIPVisionModel  # noqa: E402
from minidiff.io.files import atomic_write  # noqa: E402
from minidiff.io.loading import build_unet, build_vae  # noqa: E402
from minidiff.models.stable_diffusion import StableDiffusion  # noqa: E402
from minidiff.plugin.plugin import restore  # noqa: E402
from minidiff.plugin.files import build_plugin  # noqa: E402
from minidiff.io.weights import CLIP_IGNORED, load_strict, scb_from_diffusers  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("minidiff eager", "minidiff compiled", "diffusers eager", "diffusers compiled")


def reference_models(tiny, device):
    """The official models (diffusers UNet + VAE, transformers CLIP vision, official TPB + SCB), random fp32:
    SD-1.x / ViT-L/14 / released plugin sizes, or official_oracle's tiny ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel as RefCLIP
    torch.manual_seed(0)
    ch, ctx, clip_w = (oracle.CH, oracle.CTX, oracle.CLIP_W) if tiny else (320, 768, 1024)
    mult = (1, 2, 2, 2) if tiny else (1, 2, 4, 4)
    vae_ch = (32,) * 4 if tiny else (128, 256, 512, 512)
    clip = dict(hidden_size=clip_w, intermediate_size=(2 if tiny else 4) * clip_w, num_hidden_layers=24,
                num_attention_heads=2 if tiny else 16, image_size=224, patch_size=14, hidden_act="quick_gelu")
    with torch.device(device):  # drawn where they run: seconds instead of a minute of CPU init
        ref = dict(
            unet=UNet2DConditionModel(block_out_channels=tuple(m * ch for m in mult), cross_attention_dim=ctx,
                                      attention_head_dim=8, layers_per_block=2),
            vae=AutoencoderKL(block_out_channels=vae_ch, down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1 if tiny else 2),
            clip=RefCLIP(CLIPVisionConfig(**clip)),
            tpb=oracle.RefTPB(clip_w, ctx), scb=oracle.RefSCB(ch, oracle.HEADS if tiny else 8, ctx))
        for conv in ref["scb"].controlnet_down_blocks:  # non-zero zero convs: the SCB changes the result
            torch.nn.init.normal_(conv.weight, std=0.05)
    return {k: m.eval().requires_grad_(False) for k, m in ref.items()}


def minidiff_models(ref, dtype):
    """minidiff's models holding the reference weights in `dtype`: (StableDiffusion, CLIP vision, plugin)."""
    device = next(ref["unet"].parameters()).device
    kw = dict(dtype=dtype, device=device)
    c = ref["clip"].config
    cfg = replace(CLIP_VISION_L14, width=c.hidden_size, layers=c.num_hidden_layers, mlp=c.intermediate_size,
                  heads=c.num_attention_heads, patch_size=c.patch_size, image_size=c.image_size,
                  projection=None)
    with torch.device("meta"):
        clip = CLIPVisionModel(cfg)
    clip = load_strict(clip, ref["clip"].state_dict(), "CLIP vision", ignore=CLIP_IGNORED, **kw)
    plugin = build_plugin("derain", ref["tpb"].state_dict(), scb_from_diffusers(ref["scb"].state_dict()),
                          ref["scb"].down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads, **kw)
    unet, vae = build_unet(ref["unet"].state_dict(), **kw), build_vae(ref["vae"].state_dict(), **kw)
    return StableDiffusion(None, None, unet, vae), clip, plugin


def diffusers_step(unet, scb, latents, t, tokens, cond):
    """One model call of the official loop: SCB residuals (padded with zeros to the UNet's 12 skips + mid, as
    SCB.py and infer.py do), then the diffusers UNet's eps."""
    res = scb(latents, t, encoder_hidden_states=tokens, cond_img=cond)[:3]
    zero = cond.new_zeros(1)  # the official CPU torch.zeros(1) pads, on the GPU
    return unet(latents, t, encoder_hidden_states=tokens, down_block_additional_residuals=res + [zero] * 9,
                mid_block_additional_residual=zero).sample


@torch.no_grad()
def diffusers_restore(ref, image, steps, step=diffusers_step, seed=42):
    """official_oracle.official_restore (infer.py's loop) for one plugin, on the models' device and dtype.
    output_attentions=True is dropped from the CLIP call: it only forces transformers' slow attention."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.image_processor import VaeImageProcessor
    from transformers import CLIPImageProcessor
    p = next(ref["unet"].parameters())
    pixels = CLIPImageProcessor()(images=image, return_tensors="pt").pixel_values.to(p.device, p.dtype)
    tokens = ref["tpb"](ref["clip"](pixels, output_hidden_states=True).hidden_states)  # [1, 256, 768]
    proc = VaeImageProcessor(vae_scale_factor=8)
    x = proc.preprocess(image, height=image.height, width=image.width).to(p.device, p.dtype)
    cond = oracle.LATENT_SCALE * ref["vae"].encode(x).latent_dist.mode()
    noise = torch.randn(cond.shape, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
    sched = UniPCMultistepScheduler.from_config(oracle.SD14_SCHEDULER, final_sigmas_type="sigma_min")
    sched.set_timesteps(steps, device=p.device)
    latents = noise
    for t in sched.timesteps:
        if t >= 960:
            latents = sched.add_noise(cond, noise, t.reshape(1))
        latents = sched.step(step(ref["unet"], ref["scb"], latents, t, tokens, cond), t, latents).prev_sample
    return proc.postprocess(ref["vae"].decode(latents / oracle.LATENT_SCALE).sample, output_type="pil")[0]


def timed(fn, device, runs):
    """Median seconds of `runs` calls of fn() (synchronised on CUDA) and the last result."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def measure(restore_fn, steps, device, runs, fp32_image):
    """One row's figures for restore_fn(steps) -> PIL image."""
    if device.type == "cuda":  # from before the warm-up: CUDA graphs allocate their memory pool when recorded
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()  # weights, and the pools of earlier rows' graphs
    first, _ = timed(lambda: restore_fn(steps), device, 1)  # compiles, records CUDA graphs, warms up
    latency, image = timed(lambda: restore_fn(steps), device, runs)
    row = {"first_s": round(first, 2)}
    if device.type == "cuda":
        row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20)
    one_step, _ = timed(lambda: restore_fn(1), device, runs)
    row.update(latency_s=round(latency, 4), it_s=round((steps - 1) / max(latency - one_step, 1e-9), 2))
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(fp32_image, np.int16))
    row.update(max_levels_vs_fp32=int(diff.max()), mean_levels_vs_fp32=round(float(diff.mean()), 3))
    return row


def measure_batch(sd, clip, plugin, photo, batch, steps, device, runs):
    """photos/s of tools/sample.py --batch's loop (tools/_batch.run_plugin_batch: CLIP features, TPB, VAE
    encode, `steps` SCB + UNet steps and VAE decode for `batch` photos of one size at once)."""
    from minidiff.plugin.plugin import clip_features

    def once():
        feats = torch.cat([clip_features(clip, photo) for _ in range(batch)])  # [B, 256, 1024]: as --batch
        return run_plugin_batch(sd, plugin, feats, [photo] * batch, steps, seed=42)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    timed(once, device, 1)  # warm-up
    latency, _ = timed(once, device, runs)
    row = {"latency_s": round(latency, 4), "photos_s": round(batch / latency, 3)}
    if device.type == "cuda":
        row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20)
    return row


def sample_photo(size, seed=0):
    """A smooth random photo (low-frequency noise upsampled): the VAE and CLIP see image-like input."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size // 32 + 2, size // 32 + 2, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BICUBIC)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="photo sides (square)")
    p.add_argument("--dtypes", nargs="+", choices=["fp16", "bf16"], default=["fp16", "bf16"],
                   help="precisions")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to time")
    p.add_argument("--steps", type=int, default=20, help="UniPC steps of a restore (infer.py: 20)")
    p.add_argument("--runs", type=int, default=3, help="timed restores per figure (median)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu with --tiny to try the code paths")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of the full-size ones")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                   help="also photos/s of minidiff eager at these batch sizes (tools/sample.py --batch)")
    p.add_argument("--json", help="write the record here (rewritten after every row)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (try --tiny --device cpu; tools/bench/benchmark.py measures the CPU)")
    print(vars(args), flush=True)
    clock = time.perf_counter()
    ref32 = reference_models(args.tiny, device)
    ours32 = minidiff_models(ref32, torch.float32)
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args), "rows": []}
    compiled_ref_step = torch.compile(diffusers_step, dynamic=False, fullgraph=True,
                                      mode="reduce-overhead" if device.type == "cuda" else "default")
    models = {}  # dtype name -> ((sd, clip, plugin), reference models), made on first use
    for size in args.sizes:  # 512 first: the size the targets name
        photo = sample_photo(size)
        fp32_image = restore(*ours32[:2], [ours32[2]], photo, steps=args.steps, progress=False)
        for name in args.dtypes:
            if name not in models:
                models[name] = (minidiff_models(ref32, DTYPES[name]),
                                {k: copy.deepcopy(m).to(DTYPES[name]) for k, m in ref32.items()})
            (sd, clip, plugin), ref = models[name]
            fns = {"minidiff eager": lambda n: restore(sd, clip, [plugin], photo, steps=n, progress=False),
                   "minidiff compiled": lambda n: restore(sd, clip, [plugin], photo, steps=n, progress=False,
                                                          compile=True),
                   "diffusers eager": lambda n: diffusers_restore(ref, photo, n),
                   "diffusers compiled": lambda n: diffusers_restore(ref, photo, n, compiled_ref_step)}
            for variant in args.variants:
                row = {"dtype": name, "size": size, "variant": variant}
                print(f"... {name} {size} {variant} (at {time.perf_counter() - clock:.0f} s)", flush=True)
                try:
                    row.update(measure(fns[variant], args.steps, device, args.runs, fp32_image))
                except Exception as e:  # a failed row (NaN, out of memory, a compile error) is a result too
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                add_row(record, row, clock, args.json)
            for batch in args.batches:  # after the four variants: a cut run keeps those first
                row = {"dtype": name, "size": size, "variant": "minidiff batch", "batch": batch}
                print(f"... {name} {size} batch {batch} (at {time.perf_counter() - clock:.0f} s)", flush=True)
                try:
                    row.update(measure_batch(sd, clip, plugin, photo, batch, args.steps, device, args.runs))
                except Exception as e:  # out of memory at a large batch is a result too
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                add_row(record, row, clock, args.json)
    print(summary(record["rows"]), flush=True)


def add_row(record, row, clock, json_path):
    """Append a finished row, print it, rewrite --json (a run cut short keeps what it measured)."""
    row["elapsed_s"] = round(time.perf_counter() - clock, 1)
    record["rows"].append(row)
    print(json.dumps(row), flush=True)
    if json_path:
        atomic_write(json_path, lambda tmp: write_json(tmp, record))


def write_json(path, record):
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def summary(rows):
    """Speed of minidiff over diffusers, compiled and eager, per dtype and size (> 1: minidiff faster)."""
    lines = []
    by = {(r["dtype"], r["size"], r["variant"]): r.get("latency_s") for r in rows}
    for r in rows:
        if r["variant"] == "minidiff batch" and "photos_s" in r:
            one = next((q.get("photos_s") for q in rows if q["variant"] == "minidiff batch" and q["batch"] == 1
                        and (q["dtype"], q["size"]) == (r["dtype"], r["size"])), None)
            lines.append(f"{r['dtype']} {r['size']}: batch {r['batch']} {r['photos_s']:.3f} photos/s"
                         + (f" ({r['photos_s'] / one:.2f}x batch 1)" if one else ""))
    for dtype, size in dict.fromkeys((r["dtype"], r["size"]) for r in rows):
        for kind in ("compiled", "eager"):
            ours, theirs = (by.get((dtype, size, f"{lib} {kind}")) for lib in ("minidiff", "diffusers"))
            if ours and theirs:
                lines.append(f"{dtype} {size}: minidiff {kind} {ours:.3f} s, diffusers {kind} "
                             f"{theirs:.3f} s: {theirs / ours:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
