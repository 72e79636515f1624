#!/usr/bin/env python
"""Plain Stable Diffusion 1.x: text-to-image, or img2img from a photo, with classifier-free guidance.

    python tools/generate.py txt2img --prompt "a red car" --scheduler ddim --steps 30 --output car.png
    python tools/generate.py img2img --input photo.jpg --prompt "an oil painting" --strength 0.6
    python tools/generate.py txt2img --prompt "a red car" --fake-weights --steps 2 --size 64   # CPU-sized

Writes the PNG and, beside it, <name>.json (prompt, sampler, seed, size, timings, checkpoint hash). Same seed
and weights give diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline image (one CPU generator
for every draw, in the pipelines' order; minidiff/diffusion/pipeline.py). The base defaults to SD-1.5
(checkpoints/v1-5-pruned-emaonly.safetensors, tools/download.py --only sd15). Diff-Plugin restoration:
tools/sample.py. Exit statuses: tools/_cli.py, README "Exit status".
"""
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _cli import (OneLineParser, UsageError, add_device_flags, add_model_flag, check_writable,  # noqa: E402
                  checkpoints_root, finite_float, int_range, minidiff_version, nonblank, resolve_device, run,
                  seed)
from minidiff.family import choose_model  # noqa: E402
from minidiff.download import default_checkpoint_paths, loader_files_missing, missing_weights_message  # noqa
from minidiff.plugin.fake import FAKE_WARNING, fake_models  # noqa: E402
from minidiff.io.files import save_json_atomic, sha256_path  # noqa: E402
from minidiff.io.imageio import DEFAULT_MAX_SIDE, MIN_SIDE, cap_size, load_image, save_png_atomic  # noqa: E402
from minidiff.io.loading import load_stable_diffusion  # noqa: E402
from minidiff.models.prepack import prepack_convs  # noqa: E402
from minidiff.diffusion.pipeline import img2img, txt2img  # noqa: E402
from minidiff.plugin.plugin import NonFiniteError  # noqa: E402
from minidiff.diffusion.schedulers import NUM_TRAIN_TIMESTEPS  # noqa: E402

SCHEDULERS = ["ddpm", "ddim", "unipc", "dpmpp2m", "euler"]


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="generate.py")
    common = OneLineParser(add_help=False)  # the flags both modes take
    a = common.add_argument
    a("--prompt", type=nonblank, required=True, help="the text prompt")
    a("--negative-prompt", default="", help="what to steer away from")
    a("--output", help="the .png to write (default: out/<mode>.png); its record goes beside it as .json")
    a("--overwrite", action="store_true", help="replace an existing output PNG")
    a("--scheduler", choices=SCHEDULERS, default="ddim", help="sampler")
    a("--steps", type=int_range(1, NUM_TRAIN_TIMESTEPS), default=50, help="sampling steps")
    a("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale (<= 1: none)")
    a("--seed", type=seed, default=0, help="seed of the one CPU generator every draw comes from")
    a("--max-side", type=int_range(0), default=DEFAULT_MAX_SIDE,
      help="largest side: txt2img refuses bigger sizes, img2img scales the photo down to it (0: no limit)")
    a("--sd", help="Stable Diffusion 1.x, single file or diffusers folder (default: checkpoints/v1-5-...)")
    add_model_flag(a)
    add_device_flags(a)
    a("--compile", action="store_true", help="torch.compile the UNet (GPU only; the first call compiles)")
    a("--fake-weights", action="store_true", help="random tiny models instead of a checkpoint (for tests)")
    a("--no-progress", action="store_true", help="no progress bar")
    modes = p.add_subparsers(dest="mode", required=True, metavar="{txt2img,img2img}")
    side = int_range(MIN_SIDE, None, 8)
    t = modes.add_parser("txt2img", parents=[common], help="an image from a prompt")
    t.add_argument("--size", type=side, default=512, help="width and height (multiple of 8)")
    t.add_argument("--width", type=side, help="width (multiple of 8; overrides --size)")
    t.add_argument("--height", type=side, help="height (multiple of 8; overrides --size)")
    i = modes.add_parser("img2img", parents=[common], help="re-draw a photo after a prompt")
    i.add_argument("--input", required=True, help="the photo")
    i.add_argument("--strength", type=finite_float, default=0.8, help="share of the photo re-noised, (0, 1]")
    return p.parse_args(argv)


def check_args(args):
    """Refuse what would fail late, silently, or with a traceback, before any file is loaded."""
    out = args.output or os.path.join("out", f"{args.mode}.png")
    if not out.lower().endswith(".png") or os.path.isdir(out):
        raise UsageError(f"--output {out}: give a .png file name")
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"--output {out} exists: pass --overwrite to replace it")
    check_writable(out, is_file=True)
    args.output = out
    if args.mode == "txt2img":
        args.width, args.height = args.width or args.size, args.height or args.size
        if args.max_side and max(args.width, args.height) > args.max_side:
            raise UsageError(f"{args.width}x{args.height} is over --max-side {args.max_side} (SD 1.x draws "
                             "512 px; raise --max-side for more, memory permitting)")
    else:
        if not 0.0 < args.strength <= 1.0:
            raise UsageError("--strength must be in (0, 1]")
        if int(args.steps * args.strength) < 1:
            raise UsageError(f"--strength {args.strength} x --steps {args.steps} leaves no step to run")
        if os.path.exists(out) and os.path.samefile(out, args.input):
            raise UsageError(f"--output {out} is the input photo: inputs are never overwritten")
    args.torch_dtype = resolve_device(args)


class FiniteUNet:
    """The UNet, checking every output: a NaN or infinite eps stops the run naming the step (nothing is
    written) instead of decoding a black or garbage image."""

    def __init__(self, unet):
        self.unet, self.calls = unet, 0

    def __getattr__(self, name):  # cfg, parameters(), ... of the wrapped UNet
        return getattr(self.unet, name)

    def __call__(self, *a, **kw):
        eps = self.unet(*a, **kw)
        self.calls += 1
        if not torch.isfinite(eps).all():
            raise NonFiniteError(f"the UNet output is not finite at sampling step {self.calls}")
        return eps


def check_not_small(args):
    """The small family has no text path to generate from: its UNet was trained on the null context only
    (minidiff/train/small.py), so a prompt would mean nothing. --model small, or auto without SD-1.5 in
    checkpoints/, is refused in one line."""
    model, _ = choose_model(args.model, checkpoints_root(ROOT), ("sd",))
    if model == "small":
        raise UsageError("generate.py needs the published SD-1.5 (python tools/download.py --only sd15): the "
                         "small family's UNet is unconditional, trained without text (tools/train_small.py "
                         "writes its unconditional samples to runs/small/unet/samples.png)")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    record, notes = {}, []
    if args.mode == "img2img":
        image, resize = cap_size(load_image(args.input, notes), args.max_side)
        record = {"input": os.path.abspath(args.input), "input_notes": notes, "resize": resize,
                  "strength": args.strength}
    if not args.fake_weights and not args.sd:
        check_not_small(args)
    args.sd = args.sd or default_checkpoint_paths(checkpoints_root(ROOT))["sd"]
    missing = [] if args.fake_weights else loader_files_missing("sd", args.sd)
    if missing:
        print(missing_weights_message(missing) + "\n(or try it on random weights: --fake-weights)",
              file=sys.stderr)
        return 1
    print(f"{args.mode}: {args.scheduler} {args.steps} steps, guidance {args.guidance}, seed {args.seed}, "
          f"{args.device} {args.dtype} -> {args.output}" + ("  *** FAKE WEIGHTS ***" * args.fake_weights))
    t0 = time.perf_counter()
    kw = dict(dtype=args.torch_dtype, device=args.device)
    sd = fake_models([], False, **kw).sd if args.fake_weights else load_stable_diffusion(args.sd, **kw)
    if args.compile:
        sd.unet = torch.compile(sd.unet)
    else:  # CPU: 3x3 conv kernels packed once for oneDNN (no-op on the GPU)
        for net in (sd.unet, sd.vae):
            prepack_convs(net)
    sd.unet = FiniteUNet(sd.unet)
    t1 = time.perf_counter()
    kw = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
              scheduler=args.scheduler, seed=args.seed, progress=not args.no_progress)
    if args.mode == "txt2img":
        result = txt2img(sd, args.prompt, height=args.height, width=args.width, **kw)
    else:
        result = img2img(sd, image, args.prompt, strength=args.strength, **kw)
    t2 = time.perf_counter()
    sd_hash = None if args.fake_weights else \
        {"path": os.path.abspath(args.sd), "sha256": sha256_path(args.sd)}
    timings = {"load": round(t1 - t0, 3), "sample": round(t2 - t1, 3)}
    record.update(minidiff_version=minidiff_version(), fake_weights=args.fake_weights, mode=args.mode,
                  prompt=args.prompt, negative_prompt=args.negative_prompt, scheduler=args.scheduler,
                  steps=args.steps, guidance=args.guidance, seed=args.seed, size=list(result.size),
                  device=args.device, dtype=args.dtype, timings_s=timings, checkpoints={"sd": sd_hash},
                  **({"warning": FAKE_WARNING} if args.fake_weights else {}))
    save_png_atomic(result, args.output)
    save_json_atomic(record, args.output[:-4] + ".json")
    print(f"wrote {args.output}" + ("  *** FAKE WEIGHTS ***" * args.fake_weights))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
