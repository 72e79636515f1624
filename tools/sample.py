#!/usr/bin/env python
"""Restore photos with Diff-Plugin: the selector reads an instruction, or you name the plugins.

    python tools/sample.py --input photo.jpg --prompt "please remove the rain" --output out/
    python tools/sample.py --input photos/ --task derain dehaze --steps 20 --seed 42 --output out/
    python tools/sample.py            # examples/ -> out/examples/, instructions from examples/prompts.json
    python tools/sample.py --fake-weights --steps 2 --max-side 256 --output /tmp/try   # CPU-sized, seconds

Per photo <stem>: OUTPUT/<stem>.png (the result), <stem>-compare.png (input | result) and <stem>.json (tasks
in order, raw selector scores, sizes and the resize rule, seed, timings, checkpoint hashes, warnings), the
JSON last. Defaults are the official ones (yuhaoliu7456/Diff-Plugin @ 79e12bb): base SD-1.4, UniPC 20 steps,
seed 42, later plugins 3 steps; with --prompt demo.py's resize rule (short side to --short-side), with --task
infer.py's (short side raised to 512 when below). Weights default to checkpoints/ (tools/download.py). Plain
txt2img / img2img: tools/generate.py. Exit statuses: tools/_cli.py, README "Exit status".
"""
import os
import sys
import time
from argparse import ArgumentTypeError

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _cli import (OneLineParser, UsageError, add_device_flags, add_model_flag, add_restoration_weight_flags,  # noqa: E402
                  check_writable, finite_float, int_range, minidiff_version, nonblank, resolve_device, run,
                  seed)
from _restore_cli import (base_model_check, clean_start, fill_weight_paths, given_weights, load_fake,  # noqa: E402
                          missing_weights, plan_inputs, run_photo, stem_of)
import _batch  # noqa: E402
import _shard  # noqa: E402
from minidiff.download import missing_weights_message  # noqa: E402
from minidiff.io.files import sha256_path  # noqa: E402
from minidiff.io.imageio import (DEFAULT_MAX_SIDE, MIN_SIDE, OFFICIAL_SHORT_SIDE, RESIZE_RULES,  # noqa: E402
                              SHORT_SIDES, check_min_side, load_image, photo_size)
from minidiff.plugin.plugin import TASKS  # noqa: E402
from minidiff.plugin.files import find_plugins  # noqa: E402
from minidiff.plugin.restoration import MissingPlugins, load_models  # noqa: E402
from minidiff.diffusion.schedulers import NUM_TRAIN_TIMESTEPS  # noqa: E402
from minidiff.plugin.selector import load_composite  # noqa: E402



def max_side(text):
    """argparse type for --max-side: 0 (no cap) or at least MIN_SIDE."""
    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0 or 0 < value < MIN_SIDE:
        raise ArgumentTypeError(f"must be 0 (no cap) or at least {MIN_SIDE}, got {value}")
    return value


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="sample.py")
    a = p.add_argument
    steps = int_range(1, NUM_TRAIN_TIMESTEPS)
    a("--input", help="photo or folder of photos (default: the examples/ folder)")
    a("--output", help="output folder (default: out/, or out/examples/ for the examples)")
    a("--prompt", type=nonblank, help="instruction for the selector, e.g. \"remove the rain\"")
    a("--prompts", help="JSON {stem: instruction} giving each photo its own (default without --prompt "
                        "and --task: prompts.json in the input folder)")
    a("--task", nargs="+", help="plugins to apply, in the order given, instead of asking the selector")
    a("--composite", help="JSON composite table replacing minidiff/data/composite.json ([] for none)")
    a("--resize", choices=RESIZE_RULES, help="size rule: demo = short side always --short-side (demo.py); "
      "infer = raised to 512 only when below (infer.py). Default: demo with --prompt, infer with --task")
    a("--short-side", type=int_range(64, SHORT_SIDES[-1], 64),
      help="demo rule: the short side the photo is scaled to (default: the model's working size, 512 for the "
           "published weights: demo.py's slider 512-1024, step 64; 128 for the small family)")
    a("--max-side", type=max_side, default=DEFAULT_MAX_SIDE,
      help=f"cap on the processed long side (0: none, as official; else at least {MIN_SIDE})")
    a("--steps", type=steps, default=20, help="UniPC steps of the first plugin")
    a("--chain-steps", type=steps, default=3,
      help="steps of every plugin after the first, as the official demo; at most --steps")
    a("--seed", type=seed, default=42, help="noise seed; every photo of a folder uses the same one")
    a("--threshold", type=finite_float, default=0.0, help="selector threshold: plugins scoring above it run")
    add_model_flag(a)
    add_restoration_weight_flags(a)
    add_device_flags(a)
    a("--compile", action="store_true", help="torch.compile the UNet (GPU only; the first call compiles)")
    a("--dry-run", action="store_true", help="selection and sizes only: writes only the JSON records")
    a("--skip-existing", action="store_true", help="skip photos whose JSON record (written last) exists")
    a("--batch", type=int_range(1), default=1, help="up to N photos of one processed size (and plugins) in one "
      "VAE/SCB/UNet batch, each with its own seeded noise: within 1/255 of one at a time (tools/_batch.py)")
    a("--fake-weights", action="store_true", help="random tiny models instead of checkpoints (for tests)")
    a("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args):
    """Refuse what would fail late or silently, before any file is loaded."""
    if args.prompt is not None and args.task:
        raise UsageError("give --prompt (the selector chooses) or --task (you choose), not both")
    rule = args.resize or ("infer" if args.task else "demo")
    if rule != "demo" and args.short_side is not None:
        raise UsageError("--short-side belongs to the demo rule; add --resize demo (infer.py raises to 512)")
    args.torch_dtype = resolve_device(args)
    given_weights(args)  # with --fake-weights, a typed --plugins/--selector must exist: it is loaded


def load(args, tasks, need_selector):
    """(models, {name: file}) from the checkpoints, or random tiny models; exits 1 listing missing files."""
    kw = dict(dtype=args.torch_dtype, device=args.device)
    if args.fake_weights:  # with a typed --plugins/--selector, those files over the random base
        return load_fake(args, tasks, need_selector, **kw)
    missing = missing_weights(args, tasks, need_selector)
    try:
        if not missing:
            selector = args.selector if need_selector else None
            return load_models(args.sd, args.clip, args.plugins, tasks, selector, **kw)
    except MissingPlugins as e:
        missing = e.paths
    print(missing_weights_message(missing) + "\n(or try the tools on random tiny weights first: python "
          "tools/sample.py --fake-weights --steps 2 --max-side 256 --output /tmp/try)", file=sys.stderr)
    sys.exit(1)


def check_sizes(args):
    """The small family runs every photo at its working size (the demo rule, short side args.model_side)
    unless --resize says otherwise; the published weights take demo.py's slider, 512-1024."""
    if args.model == "small" and args.resize is None:
        args.resize = "demo"
    if args.short_side is not None and args.short_side < OFFICIAL_SHORT_SIDE and args.model != "small":
        raise UsageError(f"--short-side {args.short_side}: the published weights run at 512-1024 "
                         "(demo.py's slider); smaller sizes are for --model small")


def plan(args, shard=None):
    """Output folder, photos, {photo: instruction}, the photos still to do and the stale temporaries removed:
    every check that needs no weights, so that a mistake costs seconds. Under torchrun (shard) only this
    rank's share of the sorted photos (tools/_shard.py)."""
    out = args.output or os.path.join("out", "examples" if args.input is None else "")
    photos, prompts = plan_inputs(args.input or os.path.join(ROOT, "examples"), out, args.prompt, args.task,
                                  args.prompts)
    check_writable(out)
    fill_weight_paths(args, ROOT)  # --model: sets args.model, args.model_side
    check_sizes(args)
    found = set(TASKS) | (set(find_plugins(args.plugins)) if args.task else set())  # a trained 'mytask' too
    if args.task and (len(set(args.task)) < len(args.task) or not set(args.task) <= found):
        raise UsageError(f"--task {' '.join(args.task)}: unknown or repeated task; known: {', '.join(TASKS)}")
    for path in photos:  # every photo readable and of a usable shape before any weight is loaded
        rule = args.resize or ("demo" if prompts[path] is not None else "infer")
        size = photo_size(*load_image(path).size, rule, args.short_side, args.max_side, args.model_side)[0]
        check_min_side(size, path)
    photos = (shard or _shard.Shard()).share(photos)  # every rank checked all: all refuse a bad set alike
    todo, stale = clean_start(out, photos, args.skip_existing)
    return out, photos, prompts, todo, stale


def settings(args, models, files):
    """What every record says about the run: version, device, the base model and the checkpoints' hashes."""
    files = files or ({} if args.fake_weights else {"sd": args.sd, "clip": args.clip})  # dry run: unloaded
    hashes = {k: {"path": os.path.abspath(p), "sha256": None if args.dry_run else sha256_path(p)}
              for k, p in files.items()}
    base, warning = ({"id": "random tiny models (--fake-weights)"}, None) if args.fake_weights else \
        base_model_check(args.sd, models.plugins if models else {}, hashes.get("sd", {}).get("sha256"))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return {"minidiff_version": minidiff_version(), "mode": "plugin", "model": args.model, "device": args.device,
            "dtype": args.dtype, "base_model": base, **({"base_model_warning": warning} if warning else {}),
            "checkpoints": hashes}


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    shard = _shard.start(args)  # torchrun: rank, world size, cuda:LOCAL_RANK
    try:
        composite = load_composite(args.composite) if args.composite else None
    except ValueError as e:  # not a list of {"pattern", "tasks", "why"}
        raise UsageError(f"--composite {e}") from None
    out, photos, prompts, todo, stale = plan(args, shard)
    need_selector = any(prompts[p] is not None for p in todo)
    rank = f"rank {shard.rank} of {shard.world_size}: " if shard.distributed else ""
    print(f"{rank}restore: {len(todo)} of {len(photos)} photo(s) -> {out}  steps {args.steps}, chain "
          f"{min(args.chain_steps, args.steps)}, seed {args.seed}, resize {args.resize or 'demo/infer'}, "
          f"{args.device} {args.dtype}" + (f"; removed {len(stale)} stale temporary files" if stale else ""))
    t0 = time.perf_counter()
    if not todo:  # under torchrun this rank still joins the summary
        return 1 if shard.distributed and _shard.finish(shard, 0, [], len(photos), t0) else 0
    models, files = load(args, args.task, need_selector) if need_selector or not args.dry_run else (None, {})
    if args.compile and models is not None:
        models.sd.unet = torch.compile(models.sd.unet)  # inductor: about 1.8x the fp16 eager speed on an H200
    print(f"models ready in {time.perf_counter() - t0:.1f} s" + "  *** FAKE WEIGHTS ***" * args.fake_weights)
    kw = dict(tasks=args.task, resize=args.resize, short_side=args.short_side, model_side=args.model_side,
              max_side=args.max_side,
              steps=args.steps, chain_steps=args.chain_steps, seed=args.seed, threshold=args.threshold,
              composite=composite, dry_run=args.dry_run, progress=not args.no_progress,
              release_clip=len(todo) == 1 and args.batch <= 1,  # one photo: CLIP goes before the UNet runs
              record={**settings(args, models, files), **shard.record()})

    ready = {}  # --batch: photos restored with an earlier one's batch, still to write

    def restore_one(path):
        if args.batch > 1 and not args.dry_run and path not in ready:  # this photo and the next ones, batched
            window = todo[todo.index(path):][:8 * args.batch]
            ready.update(_batch.restore_batched(models, window, prompts, args.batch, **{
                k: v for k, v in kw.items() if k not in ("dry_run", "progress", "record", "release_clip")}))
        rec = run_photo(models, path, out, prompt=prompts[path], restored=ready.pop(path, None), **kw)
        for w in rec["warnings"]:
            tqdm.write(f"warning: {os.path.basename(path)}: {w}", file=sys.stderr)
        written = "{png,json}" if not args.dry_run else "json (dry run: no image)"
        tqdm.write(f"{path}: tasks {rec['tasks'] or 'none (no plugin applies)'} -> "
                   f"{os.path.join(out, os.path.splitext(os.path.basename(path))[0])}.{written}")
    t_run = time.perf_counter()
    bar = tqdm(todo, desc="photos", unit="photo", disable=args.no_progress or len(todo) < 2)
    done, failed = _shard.restore_share(shard, bar, restore_one, out, stem_of, tqdm.write)
    if args.fake_weights:
        print("*** FAKE WEIGHTS: random tiny models, the images mean nothing ***")
    return 1 if _shard.finish(shard, done, failed, len(photos) - len(todo), t_run) else 0


if __name__ == "__main__":
    sys.exit(run(main))
