#!/usr/bin/env python
"""Restore photos with Diff-Plugin (default mode), or run plain Stable Diffusion txt2img / img2img.

    python tools/sample.py --input photo.jpg --prompt "please remove the rain" --output out/
    python tools/sample.py --input photos/ --task derain dehaze --steps 20 --seed 42 --output out/
    python tools/sample.py            # examples/ -> out/examples/, instructions from examples/prompts.json
    python tools/sample.py --mode txt2img --prompt "a red car" --scheduler ddim --steps 30 --output car.png
    python tools/sample.py --fake-weights --steps 2 --output /tmp/try   # CPU-sized: random tiny models

Plugin mode writes, per input <stem>: OUTPUT/<stem>.png (the result, at the processed size),
<stem>-compare.png (input | result) and <stem>.json (tasks in order, raw selector scores, sizes, seed,
timings, checkpoint hashes). Weights default to checkpoints/ (tools/download.py fetches them).
Paper: Liu et al., Diff-Plugin (CVPR 2024); the loop is the official one (yuhaoliu7456/Diff-Plugin @ 79e12bb,
infer.py and demo.py): see minidiff/plugin.py, minidiff/selector.py and minidiff/runner.py.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from minidiff.imageio import DEFAULT_MAX_SIDE  # noqa: E402  (numpy + PIL only: --help stays quick)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UsageError(ValueError):
    """A mistake in the command line: printed as one line, exit status 1."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--mode", choices=["plugin", "txt2img", "img2img"], default="plugin", help="what to run")
    a("--input", help="photo or folder of photos (plugin, img2img); plugin mode default: examples/")
    a("--output", help="plugin: output folder (default out/, or out/examples/ for the examples); "
                       "txt2img/img2img: a .png file (default out/<mode>.png)")
    a("--prompt", help="plugin: the instruction the selector reads; txt2img/img2img: the text prompt")
    a("--prompts", help="JSON file {stem: instruction} giving each photo its own instruction "
                        "(default with no --prompt/--task: prompts.json in the input folder, if any)")
    a("--task", nargs="+", help="plugins to apply, in the order given, instead of asking the selector")
    a("--steps", type=int, help="sampling steps (default 20 in plugin mode, 50 in txt2img/img2img)")
    a("--chain-steps", type=int, default=3, help="steps of every plugin after the first (official demo: 3)")
    a("--seed", type=int, default=42, help="noise seed; every photo of a folder uses the same one")
    a("--threshold", type=float, default=0.0, help="selector threshold: plugins scoring above it run")
    a("--max-side", type=int, default=DEFAULT_MAX_SIDE,
      help="cap on the processed long side (0: none, as official)")
    a("--sd", help="Stable Diffusion 1.x: single file or diffusers folder (default under checkpoints/)")
    a("--clip", help="CLIP ViT-L/14 vision weights (default under checkpoints/)")
    a("--plugins", help="folder of plugins: official <task>/ folders or <task>.safetensors")
    a("--selector", help="plugin selector: official PromptTunner.pt or a minidiff .safetensors")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    a("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations precision")
    a("--compile", action="store_true", help="torch.compile the UNet (for GPUs; the first call compiles)")
    a("--dry-run", action="store_true", help="plugin: selection and preprocessing only; only the JSON")
    a("--fake-weights", action="store_true", help="random tiny models instead of checkpoints (for tests)")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--negative-prompt", default="", help="txt2img/img2img: negative prompt")
    a("--scheduler", choices=["ddpm", "ddim", "unipc", "dpmpp2m", "euler"], default="ddim",
      help="txt2img/img2img sampler")
    a("--guidance", type=float, default=7.5, help="txt2img/img2img classifier-free guidance scale")
    a("--size", type=int, default=512, help="txt2img: width and height")
    a("--width", type=int, help="txt2img: width (overrides --size)")
    a("--height", type=int, help="txt2img: height (overrides --size)")
    a("--strength", type=float, default=0.8, help="img2img: how much of the photo is re-noised (0-1)")
    return p.parse_args(argv)


def check_args(args):
    """Refuse what would fail late or silently, before any file is loaded (and before importing torch)."""
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty or blank: say what to do, e.g. --prompt \"remove the rain\"")
    if args.mode == "plugin" and args.prompt is not None and args.task:
        raise UsageError("give --prompt (the selector chooses) or --task (you choose), not both")
    if args.mode != "plugin" and not args.prompt:
        raise UsageError(f"--mode {args.mode} needs --prompt")
    if args.mode == "img2img" and not args.input:
        raise UsageError("--mode img2img needs --input PHOTO")
    for name in ("steps", "chain_steps", "size", "width", "height", "max_side"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "max_side" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 < args.strength <= 1.0:
        raise UsageError("--strength must be in (0, 1]")
    import torch
    from minidiff.schedulers import NUM_TRAIN_TIMESTEPS
    for name in ("steps", "chain_steps"):
        if (getattr(args, name) or 0) > NUM_TRAIN_TIMESTEPS:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {NUM_TRAIN_TIMESTEPS}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if args.device == "cpu" and args.dtype == "fp16":
        raise UsageError("--dtype fp16 needs --device cuda; use fp32 or bf16 on the CPU")
    args.torch_dtype = getattr(torch, DTYPES[args.dtype])
    args.steps = args.steps or (20 if args.mode == "plugin" else 50)


def torch_compile(unet):
    """The UNet through torch.compile (inductor): about 1.8x the fp16 eager speed on an H200."""
    import torch
    return torch.compile(unet)


def check_weights(args, need_selector):
    """Fill --sd/--clip/--plugins/--selector from the checkpoints/ layout, check --task names, and exit 1
    listing every missing file (unless --fake-weights)."""
    from minidiff.download import default_checkpoint_paths, missing_weights_message
    from minidiff.plugin import TASKS
    defaults = default_checkpoint_paths(os.path.join(ROOT, "checkpoints"))
    for name in ("sd", "clip", "plugins", "selector"):
        setattr(args, name, getattr(args, name) or defaults[name])
    tasks = args.task if args.mode == "plugin" else None
    found = available(args) if tasks else set()  # lists the plugin folder once
    if tasks and (len(set(tasks)) < len(tasks) or not set(tasks) <= set(TASKS) | found):
        raise UsageError(f"--task {' '.join(tasks)}: unknown or repeated task; known: {', '.join(TASKS)}")
    if args.fake_weights:
        return
    wanted = [args.sd] + ([args.clip] if args.mode == "plugin" else [])
    wanted += [args.selector, args.plugins] if need_selector else []
    missing = [p for p in wanted if not os.path.exists(p)]
    if args.mode == "plugin" and args.task:  # only the plugins asked for
        missing += [os.path.join(args.plugins, t) for t in args.task if t not in found]
    if missing:
        print(missing_weights_message(missing), file=sys.stderr)
        sys.exit(1)


def run_plugins(args, version):
    """Plugin mode: every photo of --input through the selector (or --task) and the plugins."""
    from tqdm import tqdm
    from minidiff.files import sha256_path
    from minidiff.imageio import load_image
    from minidiff.plugin import TASKS
    from minidiff.runner import FAKE_WARNING, MissingPlugins, fake_models, load_models, plan_inputs
    from minidiff.runner import run_photo
    out = args.output or os.path.join("out", "examples" if args.input is None else "")
    photos, prompts = plan_inputs(args.input or os.path.join(ROOT, "examples"), out, args.prompt, args.task,
                                  args.prompts)
    for path in photos:  # every photo readable before any weight is loaded
        load_image(path)
    need_selector = any(p is not None for p in prompts.values())
    check_weights(args, need_selector)
    fake = f"\n*** {FAKE_WARNING} ***" if args.fake_weights else ""
    print(f"mode plugin: {len(photos)} photo(s) -> {out}  steps {args.steps}, chain {args.chain_steps}, "
          f"seed {args.seed}, {args.device} {args.dtype}" + fake)
    models, files, t0 = None, {}, time.perf_counter()
    kw = dict(dtype=args.torch_dtype, device=args.device)
    if args.fake_weights:
        models = fake_models(args.task or TASKS, need_selector, **kw)
    elif need_selector or not args.dry_run:
        try:
            models, files = load_models(args.sd, args.clip, args.plugins, args.task,
                                        args.selector if need_selector else None, **kw)
        except MissingPlugins as e:
            from minidiff.download import missing_weights_message
            print(missing_weights_message(e.paths), file=sys.stderr)
            sys.exit(1)
    if args.compile and models is not None:
        models.sd.unet = torch_compile(models.sd.unet)
    print(f"models ready in {time.perf_counter() - t0:.1f} s")
    files = files or ({} if args.fake_weights else {"sd": args.sd, "clip": args.clip})  # dry run: unloaded
    settings = {"minidiff_version": version, "mode": "plugin", "device": args.device, "dtype": args.dtype,
                "checkpoints": {k: {"path": os.path.abspath(p), "sha256": None if args.dry_run
                                    else sha256_path(p)} for k, p in files.items()}}
    os.makedirs(out, exist_ok=True)
    for path in tqdm(photos, desc="photos", unit="photo", disable=args.no_progress or len(photos) < 2):
        rec = run_photo(models, path, out, prompt=prompts[path], tasks=args.task, steps=args.steps,
                        chain_steps=args.chain_steps, seed=args.seed, threshold=args.threshold,
                        max_side=args.max_side, dry_run=args.dry_run, progress=not args.no_progress,
                        record=settings)
        tqdm.write(f"{path}: tasks {rec['tasks'] or 'none (photo untouched)'} -> "
                   f"{os.path.join(out, os.path.splitext(os.path.basename(path))[0])}.{{png,json}}")
    if args.fake_weights:
        print(fake.strip())


def available(args):
    """Task names of the plugins in --plugins (files and folders), for checking --task."""
    from minidiff.plugin_files import find_plugins
    return set(find_plugins(args.plugins)) if args.plugins and os.path.isdir(args.plugins) else set()


def run_sd(args, version):
    """txt2img / img2img through minidiff.pipeline, one PNG (and its JSON record) at --output."""
    from minidiff.files import save_json_atomic, sha256_path
    from minidiff.imageio import cap_size, load_image, save_png_atomic
    from minidiff.pipeline import img2img, txt2img
    from minidiff.runner import FAKE_WARNING, fake_models
    from minidiff.loading import load_stable_diffusion
    out = args.output or os.path.join("out", f"{args.mode}.png")
    if not out.lower().endswith(".png") or os.path.isdir(out):
        raise UsageError(f"--output {out}: give a .png file name in --mode {args.mode}")
    width, height = args.width or args.size, args.height or args.size
    record, notes, resize = {}, [], None
    if args.mode == "img2img":
        if os.path.exists(out) and os.path.samefile(out, args.input):
            raise UsageError(f"--output {out} is the input photo: inputs are never overwritten")
        if int(args.steps * args.strength) < 1:
            raise UsageError(f"--strength {args.strength} x --steps {args.steps} leaves no step to run")
        image, resize = cap_size(load_image(args.input, notes), args.max_side)
        record = {"input": os.path.abspath(args.input), "input_notes": notes, "resize": resize,
                  "strength": args.strength}
    elif width % 8 or height % 8:
        raise UsageError(f"--width/--height/--size must be multiples of 8, got {width}x{height}")
    check_weights(args, False)
    fake = f"\n*** {FAKE_WARNING} ***" if args.fake_weights else ""
    print(f"mode {args.mode}: {args.scheduler} {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed}, {args.device} {args.dtype} -> {out}" + fake)
    t0 = time.perf_counter()
    kw = dict(dtype=args.torch_dtype, device=args.device)
    sd = fake_models([], False, **kw).sd if args.fake_weights else load_stable_diffusion(args.sd, **kw)
    if args.compile:
        sd.unet = torch_compile(sd.unet)
    t1 = time.perf_counter()
    kw = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
              scheduler=args.scheduler, seed=args.seed, progress=not args.no_progress)
    if args.mode == "txt2img":
        result = txt2img(sd, args.prompt, height=height, width=width, **kw)
    else:
        result = img2img(sd, image, args.prompt, strength=args.strength, **kw)
    save_png_atomic(result, out)
    t2 = time.perf_counter()
    sd_hash = None if args.fake_weights else {"path": os.path.abspath(args.sd),
                                              "sha256": sha256_path(args.sd)}
    record.update(minidiff_version=version, fake_weights=args.fake_weights, mode=args.mode,
                  prompt=args.prompt,
                  negative_prompt=args.negative_prompt, scheduler=args.scheduler, steps=args.steps,
                  guidance=args.guidance, seed=args.seed, size=list(result.size), device=args.device,
                  dtype=args.dtype, timings_s={"load": round(t1 - t0, 3), "sample": round(t2 - t1, 3)},
                  checkpoints={"sd": sd_hash}, **({"warning": FAKE_WARNING} if args.fake_weights else {}))
    save_json_atomic(record, out[:-4] + ".json")
    print(f"wrote {out}" + fake)


def is_user_error(e):
    """Errors the user can fix (bad arguments, files, weights): one line on stderr instead of a traceback."""
    if isinstance(e, (UsageError, OSError)):
        return True
    from minidiff.imageio import ImageError
    from minidiff.runner import UsageError as InputError
    from minidiff.weights import CheckpointError
    return isinstance(e, (ImageError, InputError, CheckpointError))


def main(argv=None):
    from importlib.metadata import PackageNotFoundError, version
    args = parse_args(argv)
    try:
        check_args(args)
        try:
            ver = version("minidiff")
        except PackageNotFoundError:
            ver = "unknown"
        (run_plugins if args.mode == "plugin" else run_sd)(args, ver)
    except KeyboardInterrupt:
        print("interrupted: no partial output was left behind", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
