#!/usr/bin/env python
"""Check a downloaded copy of one of the paper's datasets and write the listings minidiff's tools read.

    python tools/prepare_data.py --list                        # the eight tasks' datasets and where to get them
    python tools/prepare_data.py lowlight --root /data          # check LOL etc. under /data, write the listings
    python tools/prepare_data.py deblur --root /data --split test --out lists/

The datasets (minidiff/data/datasets.json) are those Diff-Plugin names (CVPR 2024, Sec. 4); this tool never
downloads: get each from the source the manifest names and unpack it under ROOT in the layout it shows. Per
split it globs the inputs and ground truths, names each photo by the manifest's `key` pattern, pairs inputs with
the ground truth of the same name, opens every image (--no-verify skips that), and says on one line each what
is off: files not named as expected, inputs without ground truth, unreadable files (all left out), a count other
than the published one. Then, atomically:
    OUT/TASK_train.csv        image,conditioning_image (ground truth, input; paths relative to ROOT):
                              python tools/train.py --task TASK --data OUT/TASK_train.csv --data-root ROOT ...
    OUT/TASK_test.csv         name,input,gt (paths relative to OUT; gt empty where the set has none):
                              python tools/evaluate.py --restored RESULTS --pairs OUT/TASK_test.csv ...
    OUT/TASK_test_input/      links NAME.ext -> each test input, one flat folder with unique names:
                              python tools/sample.py --input OUT/TASK_test_input --task TASK --output RESULTS
Exit statuses: tools/_cli.py's table (0 written, warnings may have been printed; a layout with nothing
usable, an unknown task or an unwritable --out is a refused request: one "error: ..." line, nothing written).
"""
import csv
import glob
import io
import json
import os
import re
import shutil
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout too
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import OneLineParser, UsageError, check_writable, exit_status, run  # noqa: E402,F401
from minidiff.io.files import atomic_write  # noqa: E402

MANIFEST = os.path.join(ROOT, "minidiff", "data", "datasets.json")
SPLITS = ("train", "test")


def load_manifest(path=MANIFEST):
    """{task: {"train": {...}, "test": {...}, "official_reference": ...}} of minidiff/data/datasets.json."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)["tasks"]


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="prepare_data.py")
    p.add_argument("task", nargs="?", help="one of the eight tasks (see --list)")
    p.add_argument("--root", help="the folder the datasets are unpacked under")
    p.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS), help="which listings")
    p.add_argument("--out", help="where the listings go (default: ROOT)")
    p.add_argument("--no-verify", action="store_true", help="do not open every image (faster)")
    p.add_argument("--list", action="store_true", help="print the manifest: datasets, sources, layouts")
    return p.parse_args(argv)


def show(line):
    print(line, file=sys.stderr)


def listing(items, limit=5):
    """'a, b, c and 7 more': a list on one line."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def keyed(root, pattern, key, what, unique=True):
    """{name: (key, path)} of the files under root matching the glob `pattern`, keyed by the regex `key` on the
    path relative to root (its groups joined by '-'); the name is the key, or with unique=False (many inputs of
    one ground truth) the file's name without extension. Files the key does not match are reported and left
    out; two files of one name are an error (the pairing would have to guess)."""
    files = sorted(glob.glob(os.path.join(root, pattern)))
    named, odd = {}, []
    for path in files:
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        m = re.search(key, rel)
        if m is None:
            odd.append(rel)
            continue
        k = "-".join(g for g in m.groups() if g)
        name = k if unique else os.path.splitext(os.path.basename(path))[0]
        if name in named:
            raise UsageError(f"{what}: {rel} and {os.path.relpath(named[name][1], root)} are both named {name}")
        named[name] = (k, path)
    if odd:
        show(f"warning: {what}: {len(odd)} file(s) not named as expected ({key}), left out: {listing(odd)}")
    return named


def readable(path):
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def test_list(root, spec, inputs):
    """RealBlur's test list: only the inputs it names (its lines are 'gt_path input_path', relative to root)."""
    path = os.path.join(root, spec["list"])
    if not os.path.isfile(path):
        show(f"warning: {spec['list']} not found under the root: every pair found is used")
        return inputs
    with open(path, encoding="utf-8") as f:
        wanted = {os.path.normpath(os.path.join(root, line.split()[-1])) for line in f if line.strip()}
    return {n: kp for n, kp in inputs.items() if os.path.normpath(kp[1]) in wanted}


def check_split(task, split, spec, root, verify):
    """[(name, input or None, gt or None)] of one split, after the checks; UsageError when none is usable."""
    what = f"{task} {split} ({spec['dataset']})"
    main = spec["input"] or spec["gt"]  # face training: clean photos only
    if not glob.glob(os.path.join(root, main)):
        raise UsageError(f"{what}: no files match {os.path.join(root, main)}; get it from {spec['source']}")
    many = spec.get("many_to_one", False)  # several inputs per ground truth (RESIDE: 35 hazy per clear)
    inputs = keyed(root, spec["input"], spec["key"], what, not many) if spec["input"] else None
    gts = {k: p for k, (_, p) in keyed(root, spec["gt"], spec["key"], what).items()} if spec["gt"] else None
    if inputs is not None and spec.get("list"):
        inputs = test_list(root, spec, inputs)
    if inputs is None:  # clean photos; the input is degraded on the fly in training
        rows = [(n, None, g) for n, g in sorted(gts.items())]
    elif gts is None:  # real photos without ground truth
        rows = [(n, p, None) for n, (_, p) in sorted(inputs.items())]
    else:
        lonely = sorted(n for n, (k, _) in inputs.items() if k not in gts)
        if lonely:
            show(f"warning: {what}: {len(lonely)} input(s) without ground truth, left out: {listing(lonely)}")
        unused = sorted(set(gts) - {k for k, _ in inputs.values()})
        if unused and not many:  # one ground truth per input expected
            show(f"warning: {what}: {len(unused)} ground truth(s) without input, not used: {listing(unused)}")
        rows = [(n, p, gts[k]) for n, (k, p) in sorted(inputs.items()) if k in gts]
    if verify:
        files = sorted({f for _, a, b in rows for f in (a, b) if f})
        bad = {f for f in files if not readable(f)}
        if bad:
            show(f"warning: {what}: {len(bad)} unreadable file(s), their pairs left out: "
                 f"{listing(sorted(os.path.relpath(f, root) for f in bad))}")
            rows = [r for r in rows if not ({r[1], r[2]} & bad)]
    if not rows:
        raise UsageError(f"{what}: no usable {'pairs' if inputs and gts else 'photos'} under {root}")
    if spec.get("count") is not None and len(rows) != spec["count"]:
        show(f"warning: {what}: {len(rows)} usable, the published count is {spec['count']}")
    return rows


def csv_text(header, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def write_links(folder, rows):
    """A fresh flat folder of links NAME.ext -> input, built beside and renamed into place; an old folder of
    this tool's links is replaced, anything else there is refused."""
    if os.path.exists(folder):
        if not os.path.isdir(folder) or any(not os.path.islink(os.path.join(folder, n)) for n in os.listdir(folder)):
            raise UsageError(f"{folder}: exists and is not a folder of links this tool made; move it away")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, inp, _ in rows:
        os.symlink(os.path.abspath(inp), os.path.join(tmp, name + os.path.splitext(inp)[1]))
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def prepare(args):
    tasks = load_manifest()
    if args.list:
        for task, t in tasks.items():
            print(f"{task}")
            for split in SPLITS:
                s = t[split]
                count = f"{s['count']:,}" if s["count"] is not None else "count varies"
                print(f"  {split:5} {s['dataset']} ({count}{'' if s['gt'] else ', no ground truth'})")
                print(f"        get: {s['source']}")
                print(f"        layout: input {s['input']}, gt {s['gt']}")
        return 0
    if args.task is None or args.root is None:
        raise UsageError("give TASK and --root DIR (or --list)")
    if args.task not in tasks:
        raise UsageError(f"{args.task}: unknown task; known: {', '.join(tasks)}")
    if not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root}: not a folder")
    out = args.out or args.root
    check_writable(out, "--out")
    results = {split: check_split(args.task, split, tasks[args.task][split], args.root, not args.no_verify)
               for split in args.split}  # every split checked before anything is written
    os.makedirs(out, exist_ok=True)
    for split, rows in results.items():
        path = os.path.join(out, f"{args.task}_{split}.csv")
        if split == "train":
            rel = lambda p: os.path.relpath(p, args.root).replace(os.sep, "/")  # noqa: E731
            write_text(path, csv_text(["image", "conditioning_image"],
                                      [(rel(g), rel(i or g)) for _, i, g in rows]))
            extra = "; the inputs are made on the fly (--degrade face)" if rows[0][1] is None else ""
            print(f"{args.task} train: {len(rows)} pairs -> {path} (tools/train.py --data {path} "
                  f"--data-root {args.root}){extra}")
        else:
            rel = lambda p: os.path.relpath(p, out).replace(os.sep, "/") if p else ""  # noqa: E731
            write_text(path, csv_text(["name", "input", "gt"], [(n, rel(i), rel(g)) for n, i, g in rows]))
            links = os.path.join(out, f"{args.task}_test_input")
            write_links(links, rows)
            gt = "with ground truth" if rows[0][2] else "no ground truth (FID/KID only)"
            print(f"{args.task} test: {len(rows)} photos, {gt} -> {path}, inputs linked in {links}")
    return 0


def main(argv=None):
    return prepare(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run(main))
