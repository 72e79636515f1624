#!/usr/bin/env python
"""Score a folder of restored images: PSNR/SSIM against paired ground truth, FID/KID against a reference.

    python tools/evaluate.py --restored out/lol --gt data/LOL/eval15/high --task lowlight --json lol.json
    python tools/evaluate.py --restored out/gopro --pairs data/gopro_test.csv --task deblur \
        --reference gopro_train_sharp.npz --weights checkpoints/ViT-B-32.pt --json gopro.json   # both

    python tools/evaluate.py --restored out/rain --reference data/rain_gt --features clip_vit_b_32 \\
        --weights checkpoints/ViT-B-32.pt --json rain.json             # the paper's CLIP-FID / KID
    python tools/evaluate.py --reference data/rain_gt --weights checkpoints/ViT-B-32.pt \\
        --save-stats rain_ref.npz                                      # reference statistics once
    python tools/evaluate.py --restored out/rain --reference rain_ref.npz --weights checkpoints/ViT-B-32.pt \\
        --json rain.json --batch-size 8                                # CPU-sized: small batches
    python tools/evaluate.py ... --features inception --weights pt_inception-2015-12-05-6726825d.pth

Features: clip_vit_b_32 = clean-fid's CLIP path (the official Diff-Plugin metrics: compute_fid(...,
model_name="clip_vit_b_32")); inception = pytorch-fid's default FID. Weights: OpenAI ViT-B-32.pt (state dict)
or a Hugging Face CLIP ViT-B/32 file/folder; pytorch-fid's pt_inception-2015-12-05-6726825d.pth.
PSNR/SSIM (--gt DIR or --pairs CSV from tools/prepare_data.py): each result pairs with the ground-truth file
of the same name without extension (x.png <-> x.jpg; with --pairs, the listing's `name` column); results
without ground truth are listed on one line and the rest scored. PSNR and SSIM on RGB and on the BT.601 Y
channel, data range 255 on the uint8 images, --crop-border pixels dropped from each side, SSIM with Wang et
al.'s 11x11 Gaussian window (sigma 1.5, K1 0.01, K2 0.03), RGB SSIM the mean over channels (conventions:
minidiff/eval/metrics.py; equal to scikit-image's to 1e-6). A result of another size than its ground truth
(sample.py returns the processed size) is resized to the ground truth's with PIL bicubic and its record says so
(--size-mismatch refuse: an error instead). One table per run (--task names it), per-photo values in --json.
FID/KID (--reference, --weights): Folders are read as clean-fid reads them: sorted recursive glob of image extensions (other files are
ignored), RGB, no EXIF rotation; a folder tools/sample.py wrote is read by its JSON records: only the results
count, not the <stem>-compare.png side-by-sides. Every image is checked before any feature is computed.
KID follows clean-fid: 100 subsets of m = min(n_restored, n_reference, 1000) images (fewer than 1000 images:
the subsets shrink to the smaller set, as in clean-fid; fewer than 2: refused), with a seeded RNG
(--kid-seed) where clean-fid's is unseeded. The paper prints KID x 100 (`kid_x100`). Exit codes as every
minidiff tool (tools/_cli.py): 0 done, 1 error, 2 bad arguments, 130 interrupted; a failed run writes nothing.
"""
import csv
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout too
    sys.path.insert(0, REPO)

from _cli import OneLineParser, check_writable, int_range, one_line, run  # noqa: E402
from minidiff.eval import metrics  # noqa: E402
from minidiff.io.files import save_json_atomic, sha256_path  # noqa: E402
from minidiff.io.weights import CheckpointError  # noqa: E402


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="evaluate.py")
    p.add_argument("--restored", help="folder of restored images (omit to only --save-stats the reference)")
    p.add_argument("--reference", help="FID/KID: folder of reference images, or --save-stats' .npz")
    p.add_argument("--gt", help="PSNR/SSIM: folder of ground-truth images, paired with the results by name")
    p.add_argument("--pairs", help="PSNR/SSIM: a test listing of tools/prepare_data.py (CSV name,input,gt)")
    p.add_argument("--task", help="the name of the table (default: the --restored folder's name)")
    p.add_argument("--crop-border", type=int_range(0), default=0, help="PSNR/SSIM: pixels dropped per side")
    p.add_argument("--size-mismatch", choices=metrics.SIZE_RULES, default="resize",
                   help="PSNR/SSIM: a result of another size than its ground truth is bicubic-resized to it, "
                        "or refused")
    p.add_argument("--features", default="clip_vit_b_32", choices=metrics.FEATURE_TYPES,
                   help="feature network")
    p.add_argument("--weights", help="FID/KID: weights of the feature network (see the docstring)")
    p.add_argument("--json", help="write the results here (JSON)")
    p.add_argument("--save-stats", help="write the reference folder's statistics (mu, sigma, feats) here")
    p.add_argument("--batch-size", type=int_range(1), default=32, help="images per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--kid-subsets", type=int_range(1), default=metrics.KID_SUBSETS,
                   help="KID: number of subsets")
    p.add_argument("--kid-subset-size", type=int_range(2), default=metrics.KID_MAX_SUBSET,
                   help="KID: largest subset")
    p.add_argument("--kid-seed", type=int, default=0, help="KID: seed of the subset draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def weights_digest(path):
    """sha256 of the weights file (a folder: of its {file: sha256} table)."""
    digest = sha256_path(path)
    return digest if isinstance(digest, str) else hashlib.sha256(json.dumps(digest).encode()).hexdigest()


def sample_results(folder):
    """The result images a tools/sample.py output folder holds, by its JSON records (the side-by-side
    <stem>-compare.png files are not results); None for a folder without such records."""
    results = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("mode") == "plugin" and isinstance(rec.get("outputs"), dict):
            results.append(os.path.join(folder, rec["outputs"]["result"]))
    return sorted(results) or None


def restored_images(folder):
    """Images of --restored that are results, and a note on what was left out."""
    files = metrics.list_images(folder)
    results = sample_results(folder) if os.path.isdir(folder) else None
    if results is None:
        return files, ""
    missing = [r for r in results if r not in files]
    if missing:
        raise metrics.MetricsError(f"{missing[0]}: named by its sample.py record but missing")
    skipped = len(files) - len(results)
    return results, f" (a tools/sample.py folder: its results only, not its {skipped} -compare.png etc.)"


def check_images(files):
    """Open and verify every image before any feature is computed (a corrupt file fails in seconds)."""
    for path in files:
        if path.endswith(".npy"):
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:
            why = str(e).splitlines()[0][:160]
            raise metrics.MetricsError(f"{path}: cannot read image ({why})") from None


def finite(name, value):
    """Refuse a non-finite statistic: it cannot be stored in the JSON, nor does it mean anything."""
    if not np.all(np.isfinite(value)):
        raise metrics.MetricsError(f"{name} is not finite (NaN or infinite features or statistics); "
                                   "nothing was written")
    return value


def read_pairs(path):
    """{name: gt file} of a tools/prepare_data.py test listing (CSV with columns name, input, gt; relative
    paths are relative to the listing's folder)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise metrics.MetricsError(f"--pairs {path}: cannot read the listing ({one_line(e)})") from None
    if not rows or not {"name", "gt"} <= set(rows[0]):
        raise metrics.MetricsError(f"--pairs {path}: not a test listing (CSV with a header name,input,gt and "
                                   "a row per photo)")
    folder = os.path.dirname(os.path.abspath(path))
    return {r["name"]: os.path.join(folder, r["gt"]) for r in rows}


def paired_inputs(args, restored):
    """{stem: (result, gt)} for PSNR/SSIM, after checking every paired image opens; one line names the
    results without ground truth (they are left out, the rest is scored)."""
    gt = read_pairs(args.pairs) if args.pairs else metrics.list_images(args.gt)
    pairs, missing = metrics.pair_by_name(restored, gt)
    if not pairs:
        raise metrics.MetricsError(f"none of the {len(restored)} results has a ground-truth file of the same "
                                   f"name in {args.pairs or args.gt}")
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        print(f"warning: {len(missing)} of {len(restored)} results have no ground truth, not scored: {shown}",
              file=sys.stderr)
    absent = [g for _, g in pairs.values() if not os.path.isfile(g)]
    if absent:
        raise metrics.MetricsError(f"{absent[0]}: ground truth named by --pairs but missing")
    check_images([f for pair in pairs.values() for f in pair])
    args.missing_gt = missing
    return pairs


def paired_scores(args, pairs):
    """PSNR/SSIM table of the paired results: means, per-photo values, the photos left out or resized.
    An identical pair's PSNR is infinite: JSON has no infinity, so it is null there, its photo listed."""
    per_photo = metrics.paired_fidelity(pairs, args.crop_border, args.size_mismatch)
    means = metrics.fidelity_means(per_photo)
    infinite = [k for k, p in per_photo.items() if math.isinf(p["psnr_rgb"]) or math.isinf(p["psnr_y"])]
    for p in per_photo.values():
        for k in ("psnr_rgb", "psnr_y"):
            p[k] = None if math.isinf(p[k]) else p[k]
    task = args.task or os.path.basename(os.path.normpath(args.restored))
    return {"task": task, "n": len(per_photo), **{k: None if math.isinf(v) else v for k, v in means.items()},
            "psnr_infinite": infinite, "missing_gt": args.missing_gt,
            "resized": sorted(k for k, p in per_photo.items() if "resized_from" in p),
            "crop_border": args.crop_border, "size_mismatch": args.size_mismatch, "data_range": 255,
            "y_channel": "BT.601: 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1])",
            "ssim_window": "Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03; RGB = mean over channels",
            "ground_truth": os.path.abspath(args.pairs or args.gt), "per_photo": per_photo}


def paired_table(t):
    """The PSNR/SSIM table printed for a run."""
    fmt = lambda v, d: "inf" if v is None else f"{v:.{d}f}"  # noqa: E731
    notes = [f"{len(t['resized'])} resized to their ground truth (bicubic)"] if t["resized"] else []
    notes += [f"{len(t['missing_gt'])} without ground truth left out"] if t["missing_gt"] else []
    return "\n".join([f"{t['task']}: {t['n']} photos" + (f" ({'; '.join(notes)})" if notes else ""),
                      f"  {'':10}{'RGB':>10}{'Y':>10}",
                      f"  {'PSNR (dB)':10}{fmt(t['psnr_rgb'], 3):>10}{fmt(t['psnr_y'], 3):>10}",
                      f"  {'SSIM':10}{fmt(t['ssim_rgb'], 4):>10}{fmt(t['ssim_y'], 4):>10}"])


def check_request(args):
    """Refuse flags that do not make one run, before any file is read. Returns (paired: PSNR/SSIM asked,
    ref_is_stats: --reference is a statistics .npz rather than a folder)."""
    paired = args.gt is not None or args.pairs is not None
    if args.gt is not None and args.pairs is not None:
        raise metrics.MetricsError("give --gt DIR or --pairs CSV for the ground truth, not both")
    if args.restored is None and not args.save_stats:
        raise metrics.MetricsError("nothing to do: give --restored (with --json) and/or --save-stats")
    if args.restored is not None and not args.json:
        raise metrics.MetricsError("--restored needs --json OUT.json for the results")
    if args.restored is not None and not paired and args.reference is None:
        raise metrics.MetricsError("nothing to score against: give --gt/--pairs (PSNR, SSIM) and/or "
                                   "--reference with --weights (FID, KID)")
    if paired and args.restored is None:
        raise metrics.MetricsError("--gt/--pairs score results: give --restored")
    if (args.reference is None) != (args.weights is None):
        raise metrics.MetricsError("FID/KID need both --reference and --weights")
    ref_is_stats = args.reference is not None and os.path.isfile(args.reference) and \
        args.reference.endswith(".npz")
    if args.save_stats and ref_is_stats:
        raise metrics.MetricsError("--save-stats needs a reference folder; this reference is statistics")
    for flag, path in (("--json", args.json), ("--save-stats", args.save_stats)):
        if path:
            check_writable(path, flag, is_file=True)
    return paired, ref_is_stats


def reference_inputs(args, restored, ref_is_stats):
    """FID/KID's inputs, checked: the --reference statistics (None for a folder) and the folder's images (None
    for statistics); each image set has at least 2 images (a covariance needs 2), each one readable."""
    reference = metrics.load_stats(args.reference, args.features) if ref_is_stats else None
    if reference is not None:
        for key in ("mu", "sigma"):
            finite(f"{args.reference}: the statistics ({key})", reference[key])
    ref_files = None if ref_is_stats else metrics.list_images(args.reference)
    for folder, files in ((args.restored, restored), (args.reference, ref_files)):
        if files is not None and len(files) < 2:  # a covariance, and KID's unbiased estimate, need 2
            raise metrics.MetricsError(f"{folder}: only {len(files)} image; FID and KID need at least 2")
        if files is not None:
            check_images(files)
    return reference, ref_files


def reference_features(args, ref_files, extractor, digest):
    """Features [N, D] and statistics (mu [D], sigma [D, D]) of the reference folder, also written to
    --save-stats when asked."""
    feats = finite("the reference features",
                   metrics.files_features(ref_files, extractor, args.batch_size, not args.no_progress,
                                          "reference"))
    if args.save_stats:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_stats)), exist_ok=True)
        metrics.save_stats(args.save_stats, feats, args.features, digest)
        print(f"saved {args.features} statistics of {len(feats)} images to {args.save_stats}")
    mu, sigma = metrics.statistics(feats)
    return {"mu": mu, "sigma": sigma, "feats": feats, "count": len(feats)}


def evaluate(args):
    """Run the evaluation; returns the result dict. Raises MetricsError / CheckpointError on bad input."""
    paired, ref_is_stats = check_request(args)
    # check every input before the slow part
    restored, note = restored_images(args.restored) if args.restored else (None, "")
    pairs = paired_inputs(args, restored) if paired else None
    if args.reference is None:  # PSNR/SSIM only
        print(f"restored: {len(restored)} images{note}")
        return {"paired": paired_scores(args, pairs)}
    reference, ref_files = reference_inputs(args, restored, ref_is_stats)
    if restored is not None:
        print(f"restored: {len(restored)} images{note}")
    if ref_files is not None:
        print(f"reference: {len(ref_files)} images")
    if not os.path.exists(args.weights):
        raise CheckpointError(f"{args.weights}: no such weights file")
    extractor = metrics.load_feature_extractor(args.features, args.weights, args.device)
    digest = weights_digest(args.weights)

    if ref_files is not None:
        reference = reference_features(args, ref_files, extractor, digest)
    if restored is None:
        return None

    feats = metrics.files_features(restored, extractor, args.batch_size, not args.no_progress, "restored")
    stats = metrics.statistics(finite("the restored features", feats))
    fid = finite("FID", metrics.frechet_distance(*stats, reference["mu"], reference["sigma"]))
    kid = m = None
    if reference["feats"] is not None:  # a clean-fid mu/sigma file has no features: FID only
        m = metrics.kid_subset_size(len(feats), len(reference["feats"]), args.kid_subset_size)
        kid = finite("KID", metrics.kernel_distance(feats, reference["feats"], args.kid_subsets,
                                                    args.kid_subset_size, seed=args.kid_seed))
    scores = {"paired": paired_scores(args, pairs)} if paired else {}
    return {**scores, "fid": fid, "kid": kid, "kid_x100": None if kid is None else 100 * kid,
            "features": args.features, "n_restored": len(feats), "n_reference": reference["count"],
            "kid_subset_size": m, "kid_subsets": args.kid_subsets, "kid_seed": args.kid_seed,
            "restored": os.path.abspath(args.restored), "reference": os.path.abspath(args.reference),
            "weights": os.path.abspath(args.weights), "weights_sha256": digest}


def main(argv=None):
    args = parse_args(argv)
    print("evaluate:", ", ".join(f"{k}={v}" for k, v in vars(args).items()))
    # errors: tools/_cli.run's exit statuses (README "Exit status"), one line each
    result = evaluate(args)
    if result is None:
        return 0
    if "paired" in result:
        print(paired_table(result["paired"]))
    if "fid" not in result:
        save_json_atomic(result, args.json)
        print(f"wrote {args.json}")
        return 0
    kid = "n/a (reference has no features)" if result["kid"] is None else \
        f"{result['kid']:.6f} (x100: {result['kid_x100']:.4f}, subsets of {result['kid_subset_size']})"
    print(f"{result['features']}: FID {result['fid']:.5f}  KID {kid}  "
          f"({result['n_restored']} restored vs {result['n_reference']} reference images)")
    save_json_atomic(result, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
