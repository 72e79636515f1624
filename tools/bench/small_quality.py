#!/usr/bin/env python
"""The small family's restoration quality on held-out photos: per task, PSNR and SSIM of the degraded input
and of the restored output against the clean photo, and the grid `input | output | clean`.

    python tools/bench/small_quality.py --photos data/small/heldout --output out/small-quality
    python tools/bench/small_quality.py --photos tests/data/heldout --tasks lowlight dehaze --output /tmp/q

Each held-out photo is scaled (PIL bicubic) to short side --size and centre-cropped to a square: the clean
photo. Its degraded copy comes from minidiff.train.degrade (seed (--seed, photo index)); the restore is the
official loop (minidiff.plugin.plugin.restore: --steps UniPC steps, noise seed --seed). PSNR/SSIM on RGB,
uint8, no border crop (minidiff.eval.metrics: Gaussian-window SSIM, Wang et al. 2004). The VAE ceiling: the
clean photo encoded (posterior mean) and decoded, with no plugin: no output of a latent model with this VAE
can be expected above it. Writes quality.json, quality.md (the table) and grid.png.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from _cli import OneLineParser, int_range, run  # noqa: E402
from minidiff.errors import UsageError  # noqa: E402
from minidiff.eval.metrics import psnr, ssim  # noqa: E402
from minidiff.family import SMALL_WORKING_SIZE, small_paths, verify_small  # noqa: E402
from minidiff.io.files import atomic_write, save_json_atomic  # noqa: E402
from minidiff.io.imageio import list_images, load_image  # noqa: E402
from minidiff.plugin.plugin import restore  # noqa: E402
from minidiff.plugin.restoration import load_models  # noqa: E402
from minidiff.train.datasets import to_training_tensor  # noqa: E402
from minidiff.train.degrade import degrade  # noqa: E402
from minidiff.train.small import to_uint8  # noqa: E402

QUALITY_TASKS = ("lowlight", "dehaze", "derain", "desnow", "highlight", "deblur")


def clean_square(image, size):
    """Short side -> size (bicubic), centre crop size x size: the clean reference."""
    w, h = image.size
    k = size / min(w, h)
    image = image.resize((max(size, round(w * k)), max(size, round(h * k))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def measure(models, photos, tasks, steps, seed):
    """{task: {"input": {psnr, ssim}, "output": {...}, "per_photo": [...]}} and the grid rows."""
    table, rows = {}, []
    for task in tasks:
        per = []
        for k, clean in enumerate(photos):
            bad = degrade(task, clean, (seed, k))
            out = restore(models.sd, models.clip_vision, [models.plugins[task]], bad, steps=steps, seed=seed,
                          progress=False)
            c, b, o = (np.asarray(x.convert("RGB")) for x in (clean, bad, out))
            per.append({"photo": k, "input_psnr": psnr(b, c), "output_psnr": psnr(o, c),
                        "input_ssim": ssim(b, c), "output_ssim": ssim(o, c)})
            if k < 3:
                rows.append((task, bad, out, clean))
        mean = {key: float(np.mean([p[key] for p in per])) for key in per[0] if key != "photo"}
        table[task] = {**mean, "gain_db": mean["output_psnr"] - mean["input_psnr"], "per_photo": per}
        print(f"{task:10s} PSNR {mean['input_psnr']:6.2f} -> {mean['output_psnr']:6.2f} dB  "
              f"SSIM {mean['input_ssim']:.3f} -> {mean['output_ssim']:.3f}", flush=True)
    return table, rows


@torch.no_grad()
def vae_ceiling(vae, photos):
    """Mean PSNR (dB) of the clean photos through the VAE alone (encode, posterior mean, decode), uint8."""
    p = next(vae.parameters())
    values = []
    for clean in photos:
        x = to_training_tensor(clean.convert("RGB"))[None].to(p.device, p.dtype)  # [1, 3, H, W] in [-1, 1]
        out = to_uint8(vae.decode(vae.encode(x)[0])[0].float().cpu())  # PIL RGB
        values.append(psnr(np.asarray(out), np.asarray(clean.convert("RGB"))))
    return float(np.mean(values))


def grid(rows, size):
    """One row per (task, photo): input | output | clean, the task written on the left."""
    label = 80
    sheet = Image.new("RGB", (label + 3 * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (task, *images) in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), task, fill="black")
        for c, im in enumerate(images):
            sheet.paste(im.resize((size, size)), (label + c * size, r * size))
    return sheet


def markdown(table, steps):
    lines = [f"| task | input PSNR | output PSNR | gain (dB) | input SSIM | output SSIM |",
             "|---|---|---|---|---|---|"]
    for task, m in table.items():
        lines.append(f"| {task} | {m['input_psnr']:.2f} | {m['output_psnr']:.2f} | {m['gain_db']:+.2f} | "
                     f"{m['input_ssim']:.3f} | {m['output_ssim']:.3f} |")
    return "\n".join(lines) + f"\n\n({steps} UniPC steps, fixed seeds)\n"


def load_small(folder):
    """The shipped family (checked against its manifest.json) or a recipe's base/ folder (same names)."""
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        verify_small(folder, ("sd", "clip", "plugins"))
    paths = small_paths(folder)
    models, _ = load_models(paths["sd"], paths["clip"], paths["plugins"])
    return models


def main(argv=None):
    p = OneLineParser(__doc__)
    a = p.add_argument
    a("--models", default=os.path.join(ROOT, "checkpoints", "small"),
      help="the small family: checkpoints/small (shipped) or a recipe's base/ folder")
    a("--photos", required=True, help="folder of held-out photos")
    a("--output", required=True, help="folder for quality.json, quality.md, grid.png")
    a("--tasks", nargs="+", default=list(QUALITY_TASKS), help="plugins to measure")
    a("--size", type=int_range(64), default=SMALL_WORKING_SIZE, help="square side of the clean photos")
    a("--steps", type=int_range(1, 1000), default=20, help="UniPC steps")
    a("--seed", type=int_range(0), default=0, help="degradation and noise seed")
    a("--limit", type=int_range(1), default=0, help="at most this many photos (0: all)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.photos) or not list_images(args.photos):
        raise UsageError(f"--photos {args.photos}: no such folder or no photos in it")
    paths = list_images(args.photos)[: args.limit or None]
    photos = [clean_square(load_image(q), args.size) for q in paths]
    t0 = time.time()
    models = load_small(args.models)
    unknown = [t for t in args.tasks if t not in models.plugins]
    if unknown:
        raise UsageError(f"--tasks {' '.join(unknown)}: no such plugin in {args.models}")
    table, rows = measure(models, photos, args.tasks, args.steps, args.seed)
    ceiling = vae_ceiling(models.sd.vae, photos)
    print(f"VAE ceiling (clean photo encoded and decoded) {ceiling:.2f} dB", flush=True)
    record = {"models": os.path.abspath(args.models), "photos": [os.path.basename(q) for q in paths],
              "vae_ceiling_psnr": ceiling,
              "size": args.size, "steps": args.steps, "seed": args.seed, "sampler": "unipc",
              "seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(), "tasks": table}
    os.makedirs(args.output, exist_ok=True)
    save_json_atomic(record, os.path.join(args.output, "quality.json"))
    text = markdown(table, args.steps) + f"VAE ceiling: {ceiling:.2f} dB\n"
    atomic_write(os.path.join(args.output, "quality.md"), lambda tmp: open(tmp, "w").write(text))
    sheet = grid(rows, args.size)
    atomic_write(os.path.join(args.output, "grid.png"), lambda tmp: sheet.save(tmp, format="PNG"))
    print(text + f"wrote {args.output}/quality.json, quality.md, grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
