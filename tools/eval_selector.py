#!/usr/bin/env python
"""Evaluate a Plugin-Selector with the paper's Table 5 metrics on held-out instructions paired with photos.

    python tools/eval_selector.py --selector runs/selector/selector.safetensors \\
        --plugins checkpoints/diff-plugin --images val_images/ --json runs/selector/eval.json
    python tools/eval_selector.py --selector checkpoints/diff-plugin/plugin_selector/PromptTunner.pt \\
        --images val_images/                                  # the official selector, same test
    python tools/eval_selector.py --selector /tmp/sel/selector.safetensors --fake-weights   # CPU-sized

Three settings (Table 5): single-task (every held-out single-task sentence), multi-task (the held-out
multi-task sentences + --combinations random combinations of held-out single-task ones), single+non (each
held-out single-task sentence joined with a held-out task-irrelevant one; only its task is a target). Each
request is scored with a photo of one of its tasks from --images (one sub-folder per task), over the plugins
of those tasks. Metrics: ZTA (eq. 7), mAP, CP, CR, CF1, OP, OR, OF1 (minidiff/eval/selector_eval.py).
--fake-weights: the random tiny networks of tools/train_selector.py --fake-weights (same tasks: same
networks); without --images, 4 random photos per corpus task, other than the training ones.
Exit status (tools/_cli.py, README): 0 done; 1 unreadable weights or I/O; 2 bad command line or data.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # _cli, also when imported by the tests
from _cli import (OneLineParser, UsageError, add_device_flags, add_model_flag, default_weights,  # noqa: E402
                  finite_float, int_range, pick_device, run, seed)
from minidiff.eval import selector_eval  # noqa: E402
from minidiff.io.files import save_json_atomic  # noqa: E402
from minidiff.plugin.files import load_selector  # noqa: E402
from minidiff.train import instructions, selector_training as st  # noqa: E402
from minidiff.train.seeding import derive_seed  # noqa: E402
FAKE_PHOTOS = 4  # random photos per task for --fake-weights without --images


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="eval_selector.py")
    a = p.add_argument
    a("--selector", required=True, help="selector file: minidiff .safetensors or official PromptTunner.pt")
    a("--images", help="folder with one sub-folder of photos per task (held-out photos)")
    a("--plugins", help="folder of plugins (default: checkpoints/ layout of tools/download.py)")
    a("--instructions", help="instruction corpus JSON (default: minidiff/data/instructions.json); its "
                             "test part is used")
    a("--cache", help="folder for the frozen CLIP/TPB/text features (shared with train_selector.py)")
    a("--threshold", type=finite_float, default=0.0, help="a task is selected when its score is above this "
                                                   "(paper and official demo: 0)")
    a("--combinations", type=int_range(0), default=200,
      help="random multi-task combinations in the multi-task setting")
    a("--seed", type=seed, default=0,
      help="seed of the combinations and of the photo paired with each request")
    a("--json", help="also write the results to this JSON file")
    a("--sd", help="SD 1.x weights, for its CLIP text encoder (default: checkpoints/ layout)")
    a("--clip", help="CLIP ViT-L/14 vision weights (default: checkpoints/ layout)")
    add_model_flag(a)
    a("--fake-weights", action="store_true",
      help="random tiny networks instead of checkpoints (trials, tests)")
    add_device_flags(a, dtype=False)
    return p.parse_args(argv)


def check_args(args):
    paths = [("--selector", args.selector)]
    if not args.fake_weights:
        default_weights(args, ROOT, {"sd": "sd14", "clip": "clip", "plugins": "plugins"})  # --model
        paths += [("--sd", args.sd), ("--clip", args.clip), ("--plugins", args.plugins)]
    for flag, path in paths:
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path}: not found")


def evaluate_selector(args):
    check_args(args)
    device = pick_device(args.device)
    corpus_file = args.instructions or instructions.CORPUS
    try:
        corpus = instructions.load_corpus(corpus_file)
    except (ValueError, OSError) as e:  # not JSON, not a corpus, unreadable: name the file
        raise UsageError(f"--instructions {corpus_file}: {e}") from None
    try:
        tasks = st.resolve_tasks(corpus, args.images, args.plugins, args.fake_weights)
        photos = (st.task_photos(args.images, tasks) if args.images else
                  st.fake_photos(tasks, FAKE_PHOTOS, derive_seed(args.seed, "fake-eval-photos")))
        sets = instructions.evaluation_sets(corpus.part("test").restrict(tasks), args.seed, args.combinations)
    except ValueError as e:
        raise UsageError(str(e)) from None
    selector = load_selector(args.selector, device=device).eval()
    fake = "  *** FAKE WEIGHTS: random tiny networks, the numbers only show the tools work ***"
    print(f"eval selector {args.selector}: {len(tasks)} tasks ({', '.join(tasks)}), "
          f"{sum(map(len, photos.values()))} photos, threshold {args.threshold:g}"
          + (fake if args.fake_weights else ""), flush=True)
    models, cache_names, _ = st.load_frozen(tasks, args.fake_weights, args.sd, args.clip, args.plugins,
                                            device)
    texts = [t for requests in sets.values() for t, _ in requests]
    photo_feats, per_task, text_feats = st.frozen_features(models, photos, texts, args.cache, cache_names)
    if photo_feats.shape[-1] != selector.proj_v.in_features:
        raise UsageError(f"--selector {args.selector}: width {selector.proj_v.in_features}, but the plugins "
                         f"give {photo_feats.shape[-1]} (a selector for other networks?)")
    results = selector_eval.evaluate(selector, sets, text_feats, photo_feats, per_task, tasks,
                                     args.threshold, args.seed)
    print(selector_eval.format_table(results))
    if args.json:
        record = {"selector": os.path.abspath(args.selector), "tasks": tasks, "threshold": args.threshold,
                  "seed": args.seed, "photos": {t: len(v) for t, v in photos.items()},
                  "fake_weights": args.fake_weights,  # NaN (an undefined metric) -> null
                  "settings": {name: {k: None if v != v else v for k, v in r.items()}
                               for name, r in results.items()}}
        save_json_atomic(record, args.json)
        print(f"wrote {args.json}")
    return results


def main(argv=None):
    """Evaluate; returns the exit status (tools/_cli.py: errors as one line)."""
    return run(lambda argv: evaluate_selector(parse_args(argv)) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
