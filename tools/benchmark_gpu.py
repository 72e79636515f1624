#!/usr/bin/env python
"""GPU speed of the SD-1.5 UNet: minidiff (eager, torch.compile) against diffusers, fp16 / bf16, same weights.

    python tools/benchmark_gpu.py --json gpu.json                 # on a CUDA machine; diffusers optional
    python tools/benchmark_gpu.py --dtypes fp16 --runs 5 --no-compile   # quick look

Random SD-1.5 weights are drawn in diffusers' UNet2DConditionModel (when diffusers is installed) and renamed
into minidiff's UNet with minidiff.weights.unet_from_diffusers, so both run the very same numbers; without
diffusers only minidiff's rows are filled. Inputs: batch 2 (a classifier-free-guidance pair) of 64x64 latents
(512x512 images), 77-token context. Each figure is the median of --runs forward passes after --warmup passes,
timed with CUDA events. Attention runs through PyTorch SDPA in both libraries (flash / memory-efficient
kernels in fp16 and bf16).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minidiff.unet import UNet, UNetConfig  # noqa: E402
from minidiff.weights import unet_from_diffusers  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def median_ms(fn, runs, warmup):
    """Median wall time of fn() in milliseconds, CUDA-synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def build_models():
    """(minidiff UNet, diffusers UNet or None) on the GPU in fp32 with identical random weights."""
    torch.manual_seed(0)
    ours = UNet(UNetConfig())
    try:
        import diffusers
    except ImportError:
        return ours.cuda().eval().requires_grad_(False), None
    ref = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    ours.load_state_dict(unet_from_diffusers(ref.state_dict()))
    return ours.cuda().eval().requires_grad_(False), ref.cuda().eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp16", "bf16"], help="precisions")
    p.add_argument("--runs", type=int, default=20, help="timed forward passes (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    p.add_argument("--batch", type=int, default=2, help="batch size (2 = one CFG step)")
    p.add_argument("--latent-size", type=int, default=64, help="latent height and width")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device; tools/benchmark.py measures the CPU")
    print(vars(args))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ours, ref = build_models()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.latent_size, args.latent_size, generator=g).cuda()
    ctx = torch.randn(args.batch, 77, 768, generator=g).cuda()
    t = torch.full((args.batch,), 500, device="cuda")
    rows = []
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = DTYPES[name]
            xs, cs = x.to(dtype), ctx.to(dtype)
            ours = ours.to(dtype)
            candidates = [("minidiff eager", lambda: ours(xs, t, cs))]
            if ref is not None:
                ref = ref.to(dtype)
                candidates.append(("diffusers eager", lambda: ref(xs, t, cs).sample))
            if not args.no_compile:
                start = time.perf_counter()
                compiled = torch.compile(ours)
                compiled(xs, t, cs)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - start
                candidates.append(("minidiff torch.compile", lambda: compiled(xs, t, cs)))
            for label, fn in candidates:
                torch.cuda.reset_peak_memory_stats()
                ms = median_ms(fn, args.runs, args.warmup)
                row = {"dtype": name, "model": label, "ms": round(ms, 3),
                       "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
                if label.endswith("compile"):
                    row["compile_s"] = round(compile_s, 1)
                rows.append(row)
                print(row, flush=True)
            if ref is not None:
                base = next(r["ms"] for r in rows if r["dtype"] == name and r["model"] == "diffusers eager")
                for r in rows:
                    if r["dtype"] == name:
                        r["vs_diffusers_eager"] = round(base / r["ms"], 3)  # > 1: faster than diffusers
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
              "rows": rows}
    print(json.dumps(record, indent=1))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
