#!/usr/bin/env python
"""Peak CPU memory of load + one restore as the photo grows, and what the VAE's tiling costs in accuracy.

    python tools/bench/bench_memory.py --json mem.json                  # every size below: hours on 2 cores
    python tools/bench/bench_memory.py --sizes 512x512 --no-untiled     # CPU-sized: one small restore, minutes
    python tools/bench/bench_memory.py --vae-only --sizes 1152x864,1632x1224 --json vae.json
    python tools/bench/bench_memory.py --profile --sizes 512x512 --dtype bf16   # where the memory goes

Networks: full-size SD-1.5 (a random single file written tensor by tensor, tools/bench/benchmark.py's
write_random_sd15), CLIP ViT-L/14 vision and one derain Task-Plugin (random, written as files), fp32 on
the CPU. Each row is one fresh process: load every file (restoration.load_models), then restore_photo with
--task derain, the infer.py size rule and no cap (max_side 0), and report the process's peak RSS. The sizes
are photos of 0.25, 1, 2, 4 and 6 megapixels and the 2834x2091 photo the official code runs out of memory
on (41 min with 1 step on 2 busy cores). The UNet runs --steps steps (1 by default): its memory does not
grow with the number of steps (each step's activations are freed before the next), so the peak of one step
is the peak of twenty.
"tiled" rows use the VAE as minidiff does (tiles above minidiff.models.vae.TILE_ABOVE pixels); "untiled" rows force
one whole-image VAE pass, where that fits. --vae-only: VAE encode + decode of the photo only (no UNet), tiled
and untiled, and the max / mean |difference| of the two decoded images (in [-1, 1] units) and latents.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from minidiff.models.vae import TILE_ABOVE  # noqa: E402
WORKER_FLAG = "--worker"  # internal: `bench_memory.py --worker JSON` measures one row
# 0.25, 1, 2, 4, 6 MP (4:3 but the first: infer.py's rule raises a short side under 512), the big photo
SIZES = "512x512,1152x864,1632x1224,2304x1728,2832x2128,2834x2091"
NEVER, ALWAYS = 10**12, 0  # vae.tile_above values: never tile, always tile


def peak_rss_gib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def test_photo(width, height):
    """A smooth random photo (bicubic-upscaled noise) of the given size, the same for a given size."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def write_files(paths, seed=0):
    """Write the random SD-1.5 single file, CLIP ViT-L/14 vision file and derain plugin file at `paths`."""
    import torch
    from safetensors.torch import save_file
    from benchmark import write_random_sd15  # tools/, beside this file
    from minidiff.models.clip import CLIP_VISION_L14, CLIPVisionModel
    from minidiff.plugin.plugin import SCB, TPB, TaskPlugin
    from minidiff.plugin.files import save_plugin
    write_random_sd15(paths["sd"], seed)
    torch.manual_seed(seed)
    save_file(CLIPVisionModel(CLIP_VISION_L14).state_dict(), paths["clip"])
    os.makedirs(paths["plugins"])
    save_plugin(TaskPlugin("derain", TPB(), SCB()), os.path.join(paths["plugins"], "derain.safetensors"))


def rss_gib(field="VmRSS"):
    """The process's resident set (VmRSS) or its peak since the last reset (VmHWM), GiB, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def reset_peak():
    """Start a new VmHWM (Linux: writing 5 to clear_refs resets the peak resident set to the current one)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def weights_gib(module):
    """Bytes of a module's parameters and buffers, GiB (prepacked convs keep theirs as plain attributes)."""
    import torch
    seen = {}
    for t in [*module.parameters(), *module.buffers()] + [v for m in module.modules() for v in vars(m).values()
                                                           if isinstance(v, torch.Tensor)]:
        if t.layout == torch.strided:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        else:  # an opaque oneDNN tensor: its dense size
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**30


def watch_stages(models, stages):
    """Record, for each call of one restore's stages (CLIP vision, VAE encode, SCB and UNet: one entry per
    step each, VAE decode), its seconds, peak RSS above the RSS before it, and the RSS after it, into
    `stages`. Modules get hooks (they hold no reference back, so a released CLIP tower is freed); the VAE's
    methods are wrapped."""
    mark = {}  # RSS and clock when the running stage began

    def before():
        mark["rss"] = rss_gib()
        reset_peak()
        mark["t"] = time.perf_counter()

    def after(name):
        row = stages.setdefault(name, {"calls": 0, "transient_gib": 0.0, "seconds": 0.0})
        row["seconds"] = round(row["seconds"] + time.perf_counter() - mark["t"], 3)
        row["calls"] += 1
        row["transient_gib"] = round(max(row["transient_gib"], rss_gib("VmHWM") - mark["rss"]), 3)
        row["peak_gib"] = round(max(row.get("peak_gib", 0.0), rss_gib("VmHWM")), 3)
        row["rss_after_gib"] = round(rss_gib(), 3)

    scb = next(iter(models.plugins.values())).scb
    for name, module in (("clip vision", models.clip_vision), ("scb step", scb), ("unet step", models.sd.unet)):
        module.register_forward_pre_hook(lambda m, a: before())
        module.register_forward_hook(lambda m, a, out, name=name: after(name))
    for name, attr in (("vae encode", "encode"), ("vae decode", "decode")):
        def call(*a, inner=getattr(models.sd.vae, attr), name=name, **k):
            before()
            out = inner(*a, **k)
            after(name)
            return out
        setattr(models.sd.vae, attr, call)


def profile(kw):
    """Memory by component: RSS after reading each part, each part's weight bytes, and each restore stage's
    transient peak above the RSS before it (fresh process; --task derain, no prompt: no text encoder, and
    the CLIP tower released after its features, as tools/sample.py does for one photo)."""
    import torch
    from minidiff.io.loading import load_clip_vision, load_stable_diffusion
    from minidiff.models.prepack import prepack_convs, return_freed_memory
    from minidiff.plugin.files import load_plugin
    from minidiff.plugin.restoration import Models, restore_photo
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kw["dtype"]]
    torch.set_num_threads(kw["threads"])
    rows = {"start": {"rss_gib": round(rss_gib(), 3)}}
    sd = load_stable_diffusion(kw["sd"], dtype=dtype, text_encoder=False)
    for net in (sd.unet, sd.vae):
        prepack_convs(net)
    rows["sd unet + vae"] = {"rss_gib": round(rss_gib(), 3), "unet_gib": round(weights_gib(sd.unet), 3),
                             "vae_encoder_gib": round(weights_gib(sd.vae.encoder), 3),
                             "vae_decoder_gib": round(weights_gib(sd.vae.decoder), 3)}
    clip = load_clip_vision(kw["clip"], dtype=dtype)
    rows["clip vision"] = {"rss_gib": round(rss_gib(), 3), "weights_gib": round(weights_gib(clip), 3)}
    plugin = load_plugin(os.path.join(kw["plugins"], "derain.safetensors"), "derain", dtype=dtype)
    prepack_convs(plugin.scb)
    return_freed_memory()  # as load_models does after packing
    rows["plugin"] = {"rss_gib": round(rss_gib(), 3), "weights_gib": round(weights_gib(plugin), 3)}
    rows["load peak"] = {"rss_gib": round(rss_gib("VmHWM"), 3)}  # before the stages reset the high-water mark
    models, stages = Models(sd, clip, {"derain": plugin}, None), {}
    del sd, clip, plugin  # the Models hold the only references (release_clip can then free the tower)
    watch_stages(models, stages)
    photo = test_photo(kw["width"], kw["height"])
    restore_photo(models, photo, tasks=["derain"], max_side=0, steps=kw["steps"], progress=False,
                  release_clip=True)  # as tools/sample.py restores one photo
    # clear_refs resets the kernel's high-water mark (getrusage's too): the peak is the largest one recorded
    peak = max([rows["load peak"]["rss_gib"]] + [r["peak_gib"] for r in stages.values()])
    return {"load": rows, "restore": stages, "peak_gib": round(peak, 3)}


def worker(kw):
    """One row in this (fresh) process; returns a dict of figures."""
    import resource
    import torch
    from minidiff.io.imageio import pil_to_tensor
    torch.set_num_threads(kw["threads"])
    # address-space cap: a row that does not fit fails with an allocation error, not by the OOM killer
    limit = int(kw["max_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    photo = test_photo(kw["width"], kw["height"])
    t = time.perf_counter()
    if kw.get("profile"):
        return profile(kw)
    if kw["vae_only"]:
        from minidiff.io.loading import build_vae
        from minidiff.io.weights import read_state_dict
        vae = build_vae(read_state_dict(kw["sd"], "first_stage_model."))
        vae.tile_above = NEVER if kw["untiled"] else ALWAYS
        loaded = peak_rss_gib()
        with torch.inference_mode():
            mean, _ = vae.encode(pil_to_tensor(photo)[:, :, :photo.height // 8 * 8, :photo.width // 8 * 8])
            image = vae.decode(mean)
        torch.save({"latent": mean, "image": image}, kw["out"])
        size = tuple(image.shape[:1:-1])  # (W, H)
    else:
        from minidiff.plugin.restoration import load_models, restore_photo
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kw["dtype"]]
        models, _ = load_models(kw["sd"], kw["clip"], kw["plugins"], tasks=["derain"], dtype=dtype)
        if kw["untiled"]:
            models.sd.vae.tile_above = NEVER
        loaded = peak_rss_gib()
        out = restore_photo(models, photo, tasks=["derain"], max_side=0, steps=kw["steps"], progress=False,
                            release_clip=True)  # as tools/sample.py restores one photo
        size = out.size  # infer.py's rule: a side under 512 raises the short side to 512
    return {"seconds": round(time.perf_counter() - t, 1), "load_peak_gib": round(loaded, 2),
            "peak_gib": round(peak_rss_gib(), 2), "processed": "x".join(map(str, size))}


def run_row(args, paths, width, height, untiled, out):
    kw = dict(paths, width=width, height=height, untiled=untiled, steps=args.steps, threads=args.threads,
              vae_only=args.vae_only, out=out, max_gib=args.max_gib, dtype=args.dtype, profile=args.profile)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), WORKER_FLAG, json.dumps(kw)],
                          capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. killed for memory (-9): a row that does not fit
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1],
                "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def difference(a_path, b_path):
    """max and mean |tiled - untiled| of the decoded images and of the latents, and mean |untiled|."""
    import torch
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    out = {f"{k}_{s}": round(float(getattr((a[k] - b[k]).abs(), s)()), 4)
           for k in ("image", "latent") for s in ("max", "mean")}
    # the untiled values' own size, to read the differences against (random weights are not in [-1, 1])
    sizes = {f"{k}_untiled_mean_abs": round(float(b[k].abs().mean()), 4) for k in ("image", "latent")}
    return {**out, **sizes}


def print_profile(args, paths, sizes, tmp):
    """--profile: one fresh process per size; prints the load rows and the restore stages."""
    record = {"mode": "profile", "dtype": args.dtype, "threads": args.threads, "rows": []}
    for w, h in sizes:
        row = {"width": w, "height": h, **run_row(args, paths, w, h, False, os.path.join(tmp, "p.pt"))}
        record["rows"].append(row)
        if "error" in row:
            print(f"{w}x{h}: {row['error']}")
            continue
        print(f"{w}x{h} {args.dtype}: peak {row['peak_gib']} GiB")
        for name, r in row["load"].items():
            sizes_text = ", ".join(f"{k[:-4]} {v}" for k, v in r.items() if k != "rss_gib")
            print(f"  load {name:14s} RSS {r['rss_gib']:6.2f} GiB  {sizes_text}")
        for name, r in row["restore"].items():
            print(f"  run  {name:16s} x{r['calls']:<3d} {r['seconds']:7.2f} s, transient "
                  f"+{r['transient_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB, RSS after "
                  f"{r['rss_after_gib']:.2f} GiB")
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(args.json + ".tmp", args.json)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default=SIZES, help="comma-separated WIDTHxHEIGHT photos")
    p.add_argument("--steps", type=int, default=1, help="UNet steps per restore (memory is per step)")
    p.add_argument("--untiled-up-to", type=float, default=6.1,
                   help="also run an untiled row for photos up to this many megapixels")
    p.add_argument("--no-untiled", action="store_true", help="tiled (minidiff's default) rows only")
    p.add_argument("--vae-only", action="store_true", help="VAE encode + decode only, and tiled vs untiled")
    p.add_argument("--max-gib", type=float, default=22.0,
                   help="address-space limit per row (GiB): a row over it reports an error, not an OOM kill")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="restore: the networks' dtype (the files are fp32; loading casts tensor by tensor)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per row")
    p.add_argument("--files", help="folder with sd15.safetensors, clip.safetensors, plugins/ (written there "
                   "when missing; default: a temporary folder)")
    p.add_argument("--profile", action="store_true",
                   help="memory by component instead: RSS after each part is read, each part's weights, "
                        "each restore stage's transient peak (one row per size)")
    p.add_argument("--json", help="write the rows here as JSON")
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.files or tmp
        paths = {k: os.path.join(folder, n) for k, n in
                 (("sd", "sd15.safetensors"), ("clip", "clip.safetensors"), ("plugins", "plugins"))}
        if not os.path.exists(paths["plugins"]):
            print(f"writing random SD-1.5, CLIP ViT-L/14 and plugin files to {folder} ...", flush=True)
            os.makedirs(folder, exist_ok=True)
            write_files(paths)
        if args.profile:
            return print_profile(args, paths, sizes, tmp)
        rows = []
        print(f"{'photo':>10} {'MP':>5} {'VAE':>8} {'load GiB':>9} {'peak GiB':>9} {'s':>7}  difference")
        for w, h in sizes:
            mp = w * h / 1e6
            # a restore's VAE tiles only above TILE_ABOVE: below, its one row is already untiled
            tiles = args.vae_only or (w // 8 * 8) * (h // 8 * 8) > TILE_ABOVE
            runs = [False] + ([True] if tiles and not args.no_untiled and mp <= args.untiled_up_to else [])
            for untiled in runs:
                out = os.path.join(tmp, f"{w}x{h}-{untiled}.pt")
                row = {"width": w, "height": h, "megapixels": round(mp, 2), "steps": args.steps,
                       "dtype": "fp32" if args.vae_only else args.dtype,
                       "vae": "tiled" if tiles and not untiled else "untiled",
                       **run_row(args, paths, w, h, untiled, out)}
                if untiled and args.vae_only and "error" not in row and "error" not in rows[-1]:
                    row.update(difference(out.replace("-True", "-False"), out))
                rows.append(row)
                diff = {k: v for k, v in row.items() if k.startswith(("image_", "latent_"))}
                print(f"{w}x{h:<5} {mp:5.2f} {row['vae']:>8} {row.get('load_peak_gib', '-'):>9} "
                      f"{row.get('peak_gib', '-'):>9} {row.get('seconds', '-'):>7}  "
                      f"{row.get('error', '') or diff or ''}", flush=True)
                if args.json:  # after every row: a long run stopped early keeps what it measured
                    record = {"mode": "vae" if args.vae_only else "restore", "threads": args.threads,
                              "rows": rows}
                    with open(args.json + ".tmp", "w") as f:
                        json.dump(record, f, indent=1)
                    os.replace(args.json + ".tmp", args.json)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
