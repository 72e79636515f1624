#!/usr/bin/env python
"""Serve a local web page for restoring photos with Diff-Plugin (the official Gradio demo's reach).

    python tools/serve.py                         # http://127.0.0.1:7860, models from checkpoints/
    python tools/serve.py --host 0.0.0.0 --port 8080 --device cuda --dtype fp16
    python tools/serve.py --fake-weights          # CPU-sized: random tiny models, the page without weights

Upload a photo, type an instruction or press a preset (or pick plugins), see the selector's scores and the
plan (tools/sample.py's dry run), run, compare before/after, download the PNG and its JSON record (the one
tools/sample.py writes). Uploads and results live in a private temporary folder removed on exit; Ctrl-C
stops. One worker runs the jobs in order. The server: tools/_serve.py; a job: tools/_serve_restore.py.
"""
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _cli import (OneLineParser, UsageError, add_device_flags, add_model_flag, add_restoration_weight_flags,  # noqa: E402
                  finite_float, int_range, resolve_device, run)
from _serve import DEFAULT_PORT, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS  # noqa: E402
from minidiff.io.imageio import DEFAULT_MAX_SIDE, MIN_SIDE  # noqa: E402

# --fake-weights' default cap: random tiny models take ~1-3 s a step at 768x512 on one CPU core, 0.1 s at 256
FAKE_MAX_SIDE = 256


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="serve.py")
    a = p.add_argument
    positive = int_range(1)
    a("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; think first)")
    a("--port", type=int_range(0, 65535), default=DEFAULT_PORT, help="port (0: any free one, printed)")
    add_restoration_weight_flags(a)
    add_device_flags(a)
    a("--chain-steps", type=positive, default=3, help="steps of every plugin after the first (official: 3)")
    a("--threshold", type=finite_float, default=0.0, help="selector threshold: plugins scoring above it run")
    a("--max-side", type=int_range(0), help=f"cap on the processed long side (0: none, as official; else at "
      f"least {MIN_SIDE}); default {DEFAULT_MAX_SIDE}, {FAKE_MAX_SIDE} with --fake-weights (a quick try)")
    a("--max-upload-mb", type=finite_float, default=MAX_UPLOAD_BYTES / 2**20, help="largest upload, MiB")
    a("--max-megapixels", type=finite_float, default=MAX_UPLOAD_PIXELS / 1e6,
      help="largest upload in pixels, checked from the file's header before decoding")
    a("--examples", default=os.path.join(ROOT, "examples"), help="photos (+ prompts.json) the page offers")
    a("--history", type=positive, default=12, help="finished jobs kept (results and records)")
    a("--max-queue", type=positive, default=16, help="jobs that may wait at once")
    add_model_flag(a)
    a("--fake-weights", action="store_true", help="random tiny models instead of checkpoints (for tests)")
    a("--verbose", action="store_true", help="log every request")
    return p.parse_args(argv)


def check_args(args):
    """Refuse what would fail later, before any weight is loaded; returns the torch dtype."""
    if args.max_side is None:
        args.max_side = FAKE_MAX_SIDE if args.fake_weights else DEFAULT_MAX_SIDE
    if 0 < args.max_side < MIN_SIDE:
        raise UsageError(f"--max-side must be 0 (no cap) or at least {MIN_SIDE}")
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise UsageError("--max-upload-mb and --max-megapixels must be positive")
    if not os.path.isdir(args.examples):
        raise UsageError(f"--examples {args.examples}: no such folder (the photos the page offers)")
    from _restore_cli import given_weights
    given_weights(args)  # with --fake-weights, a typed --plugins/--selector must exist: it is loaded
    return resolve_device(args)


def load(args, dtype):
    """(models, {name: file}): every plugin and the selector, or random tiny models; exits 1 listing
    missing files (as tools/sample.py)."""
    from _restore_cli import fill_weight_paths, load_fake, missing_weights
    from minidiff.download import missing_weights_message
    from minidiff.plugin.restoration import MissingPlugins, load_models
    kw = dict(dtype=dtype, device=args.device)
    if args.fake_weights:
        args.model, args.model_side = "fake", None
        return load_fake(args, None, True, **kw)  # a typed --plugins/--selector over the random base
    fill_weight_paths(args, ROOT)  # --model: sets args.model, args.model_side
    missing = missing_weights(args, None, True)
    try:
        if not missing:
            return load_models(args.sd, args.clip, args.plugins, None, args.selector, **kw)
    except MissingPlugins as e:
        missing = e.paths
    print(missing_weights_message(missing) + "\n(or try the page on random weights: --fake-weights)",
          file=sys.stderr)
    sys.exit(1)


def record_fields(args, models, files):
    """record(dry_run) -> the fields tools/sample.py adds to every record (version, device, base model,
    checkpoint hashes); the hashes are computed in the background, and a real job's record waits for them."""
    from importlib.metadata import PackageNotFoundError, version
    from _restore_cli import base_model_check
    from minidiff.io.files import sha256_path
    try:
        ver = version("minidiff")
    except PackageNotFoundError:
        ver = "unknown"
    common = {"minidiff_version": ver, "mode": "plugin", "model": args.model, "device": args.device,
              "dtype": args.dtype}
    done = {}

    def hash_files():
        hashes = {k: {"path": os.path.abspath(p), "sha256": sha256_path(p)} for k, p in files.items()}
        base, warning = ({"id": "random tiny models (--fake-weights)"}, None) if args.fake_weights else \
            base_model_check(args.sd, models.plugins, hashes["sd"]["sha256"])
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        done.update(base_model=base, **({"base_model_warning": warning} if warning else {}),
                    checkpoints=hashes)
    hasher = threading.Thread(target=hash_files, daemon=True)
    hasher.start()

    def record(dry_run):
        if dry_run:  # as the CLI's dry run: no hashes
            hashes = {k: {"path": os.path.abspath(p), "sha256": None} for k, p in files.items()}
            return {**common, **{k: v for k, v in done.items() if k != "checkpoints"}, "checkpoints": hashes}
        hasher.join()
        return {**common, **done}
    return record


def main(argv=None):
    args = parse_args(argv)
    dtype = check_args(args)
    from _serve import App, serve
    from _serve_restore import Restorer
    t0 = time.perf_counter()
    models, files = load(args, dtype)
    fake = "  *** FAKE WEIGHTS: random tiny models, the images mean nothing ***" if args.fake_weights else ""
    print(f"models ready in {time.perf_counter() - t0:.1f} s: {len(models.plugins)} plugins, "
          f"{args.device} {args.dtype}{fake}", flush=True)
    settings = dict(device=args.device, dtype=args.dtype, max_side=args.max_side,
                    model_side=args.model_side if getattr(args, "model", None) == "small" else None,
                    chain_steps=args.chain_steps, threshold=args.threshold)
    restorer = Restorer(models, settings, record_fields(args, models, files))
    app = App(restorer, examples=args.examples, max_bytes=int(args.max_upload_mb * 2**20),
              max_pixels=int(args.max_megapixels * 1e6), history=args.history, max_waiting=args.max_queue)
    print(f"temporary files: {app.folder} (removed on exit)", flush=True)
    serve(app, args.host, args.port, verbose=args.verbose)  # until Ctrl-C; a taken port: OSError, exit 1
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
