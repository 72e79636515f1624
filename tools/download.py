#!/usr/bin/env python
"""Download the weights minidiff runs on into checkpoints/: resumable, with progress bars and hash checks.

    python tools/download.py                      # SD-1.4, CLIP ViT-L/14, the 8 official plugins and selector
    python tools/download.py --list               # what can be fetched, sizes, what is already there
    python tools/download.py --only sd15 clip-l14 plugin-derain     # just these (keys or groups, see --list)
    python tools/download.py --only metrics       # CLIP ViT-B/32 + FID Inception, for tools/evaluate.py
    python tools/download.py --only sd15          # SD-1.5 single file: tools/generate.py's default
    python tools/download.py --base-url http://mirror/checkpoints   # a mirror laid out like checkpoints/

An interrupted download resumes from `<file>.part` on the next run; a file is renamed into place only once its
size and published sha256 check out (files without a published hash: size only, and never a web page). Exit
codes as every minidiff tool (tools/_cli.py): 0 done, 1 a download failed, 2 bad arguments, 130 interrupted.
HF_TOKEN is sent to Hugging Face (needed for gated models) and HF_ENDPOINT redirects Hugging Face URLs to a
mirror. The registry (URLs, sizes, hashes) is in minidiff/download.py; checkpoints/README.md describes the
files and their licences.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _cli, also when loaded by path (tests)

from _cli import OneLineParser  # noqa: E402
from minidiff.download import CHECKPOINTS, GROUPS, expand_keys, human_size  # noqa: E402
from minidiff.download import download  # noqa: E402


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="download.py")
    p.add_argument("--only", nargs="+", metavar="KEY", default=["default"],
                   help=f"registry keys or groups ({', '.join(GROUPS)}) to fetch")
    p.add_argument("--list", action="store_true", help="list the registry and what is present, fetch nothing")
    p.add_argument("--dir", default=os.path.join(ROOT, "checkpoints"), help="the checkpoints folder")
    p.add_argument("--base-url", help="fetch every file from BASE_URL/<path under checkpoints/> instead")
    p.add_argument("--verify", action="store_true", help="also re-hash files that are already there")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.keys = expand_keys(args.only)
    except ValueError as e:
        p.error(f"--only: {e}")
    if args.base_url and not args.base_url.startswith(("http://", "https://")):
        p.error(f"--base-url {args.base_url!r}: want an http:// or https:// URL")
    return args


def list_registry(root):
    """One line per registry key: present or not, path, total size, description; then the groups."""
    for key, ckpt in CHECKPOINTS.items():
        sizes = [f.size for f in ckpt.files]
        total = None if None in sizes else sum(sizes)
        here = all(os.path.isfile(os.path.join(root, f.path)) for f in ckpt.files)
        mark = "x" if here else " "
        print(f"[{mark}] {key:17s} {ckpt.path:45s} {human_size(total):>12s}  {ckpt.description}")
    for name, keys in GROUPS.items():
        print(f"group {name}: {' '.join(keys)}")


def failure_summary(errors):
    """One line for downloads that all failed to connect: what failed and what to do next."""
    hosts = sorted({e.split("//")[1].split("/")[0].split(":")[0] for e in errors if "//" in e})
    return (f"could not reach {', '.join(hosts)} ({len(errors)} files not downloaded; no network?). Use a "
            "mirror (--base-url URL, or HF_ENDPOINT=URL for Hugging Face), copy the files in by hand "
            "(checkpoints/README.md), or try the tools on random weights first: "
            "python tools/sample.py --fake-weights --steps 2 --max-side 256 --output /tmp/try")


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        list_registry(args.dir)
        return 0
    print(f"checkpoints folder: {args.dir}; fetching: {' '.join(args.keys)}")
    try:
        errors, checks = download(args.keys, args.dir, base_url=args.base_url, progress=not args.no_progress,
                                  verify=args.verify)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the checkpoints folder itself cannot be made or written
        print(f"error: {e.filename or args.dir}: {(e.strerror or str(e)).lower()}", file=sys.stderr)
        return 1
    if errors and not checks and all("cannot connect" in e or "not tried" in e for e in errors):
        print(f"error: {failure_summary(errors)}", file=sys.stderr)  # nothing came: one line, not 33
        return 1
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if not errors:
        hashed = sum(how == "sha256" for how in checks.values())
        print(f"all {len(checks)} files present: {hashed} checked against their published sha256, "
              f"{len(checks) - hashed} by size only (no published hash)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
