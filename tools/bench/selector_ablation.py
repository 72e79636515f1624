#!/usr/bin/env python
"""Ablation of the Plugin-Selector's loss: tools/train_selector.py then tools/eval_selector.py for each
--loss (decoupled, infonce, supcon, sigmoid) and seed, and a table of ZTA / mAP / CF1 on the three settings of the
paper's Table 5 (held-out instructions), mean and spread over the seeds.

    python tools/bench/selector_ablation.py --fake-weights --output runs/selector-ablation      # tiny random nets
    python tools/bench/selector_ablation.py --model small --images sel_train/ --eval-images sel_val/ \\
        --output runs/selector-ablation-small                 # the small family (once the tools take --model)
    python tools/bench/selector_ablation.py --sd SD --clip CLIP --plugins DIR --images sel_train/ \\
        --eval-images sel_val/ --steps 5000 --lr 1e-5 --output runs/selector-ablation-published

Writes OUTPUT/ablation.md (the table, the commands, the winner) and OUTPUT/ablation.json (every run's
metrics and command), atomically; the runs themselves in OUTPUT/<loss>-seed<k>/ (a second call reuses
finished runs: delete a run folder to redo it). The winner: the highest mean of ZTA, mAP and CF1 over the
three settings (seed means). One metric alone misleads here: ZTA and CF1 at theta = 0 depend on where the
scores' zero falls, which none of the three eq. 6 readings pins (they see score differences only; sigmoid
trains it), and mAP is blind to the threshold.
--fake-tasks T1 T2 ...: with --fake-weights, write seeded random photos for only these tasks (8 training,
4 held-out per task) and train/evaluate on them (the tools' --images), instead of every corpus task.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
LOSSES = ("decoupled", "infonce", "supcon", "sigmoid")
SETTINGS = ("single-task", "multi-task", "single+non")
METRICS = ("ZTA", "mAP", "CF1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--output", required=True, help="folder for the runs, ablation.md and ablation.json")
    a("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    a("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one training run per loss and seed")
    a("--steps", type=int, default=2000, help="selector updates per run")
    a("--lr", type=float, default=1e-3, help="AdamW lr (paper 1e-5; tiny random networks need more)")
    a("--batch-size", type=int, default=8)
    a("--negatives", type=int, default=7)
    a("--fake-weights", action="store_true", help="random tiny networks (both tools' --fake-weights)")
    a("--fake-tasks", nargs="+", help="with --fake-weights: only these tasks (random photos written to OUTPUT)")
    a("--model", help="forwarded as --model to both tools (e.g. small, once the tools take it)")
    a("--sd", help="forwarded to both tools")
    a("--clip", help="forwarded to both tools")
    a("--plugins", help="forwarded to both tools")
    a("--instructions", help="forwarded to both tools")
    a("--images", help="training photos, one sub-folder per task (train_selector.py --images)")
    a("--eval-images", help="held-out photos, one sub-folder per task (eval_selector.py --images)")
    a("--cache", help="feature cache shared by all runs (default: OUTPUT/cache)")
    a("--device", default="auto")
    return p.parse_args(argv)


def common_flags(args):
    flags = ["--device", args.device, "--cache", args.cache or os.path.join(args.output, "cache")]
    if args.fake_weights:
        flags.append("--fake-weights")
    for name in ("model", "sd", "clip", "plugins", "instructions"):
        if getattr(args, name):
            flags += [f"--{name}", getattr(args, name)]
    return flags


def run_tool(cmd, log):
    """Run one tool, its output into `log`; a failure stops the ablation with the tool's last line."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        with open(log) as f:
            last = [line for line in f.read().splitlines() if line.strip()][-1:]
        raise SystemExit(f"error: {shlex.join(cmd)} exited {rc}: {last[0] if last else ''} (log: {log})")


def write_fake_photos(output, tasks):
    """Seeded random photos of `tasks` as OUTPUT/images/<task>/ (8 each) and OUTPUT/eval-images/<task>/ (4)."""
    from minidiff.train.selector_training import fake_photos
    folders = []
    for name, per_task, seed in (("images", 8, 0), ("eval-images", 4, 1)):
        folder = os.path.join(output, name)
        for task, photos in fake_photos(tasks, per_task, seed).items():
            os.makedirs(os.path.join(folder, task), exist_ok=True)
            for k, photo in enumerate(photos):
                photo.save(os.path.join(folder, task, f"{k}.png"))
        folders.append(folder)
    return folders


def one_run(args, loss, seed):
    """Train + evaluate one (loss, seed); returns (record, [train command, eval command])."""
    folder = os.path.join(args.output, f"{loss}-seed{seed}")
    result = os.path.join(folder, "eval.json")
    train = [sys.executable, "tools/train_selector.py", "--output", folder, "--loss", loss, "--seed", str(seed),
             "--steps", str(args.steps), "--lr", repr(args.lr), "--batch-size", str(args.batch_size),
             "--negatives", str(args.negatives), "--checkpoint-every", str(args.steps), "--keep-checkpoints", "1",
             *common_flags(args)] + (["--images", args.images] if args.images else [])
    evaluate = [sys.executable, "tools/eval_selector.py", "--selector", os.path.join(folder, "selector.safetensors"),
                "--json", result, *common_flags(args)] + (["--images", args.eval_images] if args.eval_images else [])
    if not os.path.exists(result):
        if not os.path.exists(os.path.join(folder, "selector.safetensors")):
            os.makedirs(args.output, exist_ok=True)
            run_tool(train, os.path.join(args.output, f"{loss}-seed{seed}.train.log"))
        run_tool(evaluate, os.path.join(args.output, f"{loss}-seed{seed}.eval.log"))
    with open(result) as f:
        record = json.load(f)
    return record, [train, evaluate]


def summarize(runs, losses):
    """{loss: {setting: {metric: (mean, sd)}}} over the seeds, the winner, {loss: mean of the table's cells}."""
    table = {}
    for loss in losses:
        table[loss] = {}
        for setting in SETTINGS:
            table[loss][setting] = {}
            for m in METRICS:
                vals = [r["settings"][setting][m] for r in runs[loss]]
                table[loss][setting][m] = mean_sd([float("nan") if v is None else v for v in vals])
    score = {loss: mean_sd([table[loss][s][m][0] for s in SETTINGS for m in METRICS])[0] for loss in losses}
    return table, max(losses, key=lambda loss: -math.inf if math.isnan(score[loss]) else score[loss]), score


def mean_sd(values):
    """Mean and sample standard deviation (0 for one value); NaN in, NaN out (an undefined metric)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown(table, winner, score, args, commands):
    head = "| loss | " + " | ".join(f"{s} {m}" for s in SETTINGS for m in METRICS) + " | mean |"
    rows = [head, "|" + "---|" * (2 + len(SETTINGS) * len(METRICS))]
    for loss, per in table.items():
        cells = [f"{per[s][m][0]:.3f} ± {per[s][m][1]:.3f}" for s in SETTINGS for m in METRICS]
        rows.append(f"| {loss}{' (best)' if loss == winner else ''} | " + " | ".join(cells)
                    + f" | {score[loss]:.3f} |")
    what = "tiny random networks (--fake-weights)" if args.fake_weights else f"model {args.model or args.sd}"
    if args.fake_tasks:
        what += f", tasks {' '.join(args.fake_tasks)}"
    lines = [f"Selector loss ablation on {what}: {args.steps} steps, batch {args.batch_size}, N = "
             f"{args.negatives}, lr {args.lr:g}, seeds {' '.join(map(str, args.seeds))}; mean ± sd over seeds.",
             "", *rows, "", f"Winner (highest mean of ZTA, mAP and CF1 over the three settings): {winner}.", "",
             "Commands (one seed shown):", "", "```",
             *[shlex.join(c) for loss in table for c in commands[loss][:2]], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.steps <= 0 or not args.lr > 0:
        raise SystemExit("error: --steps and --lr must be positive")
    if not args.fake_weights and not (args.images and args.eval_images):
        raise SystemExit("error: without --fake-weights give --images (training) and --eval-images (held-out)")
    from minidiff.io.files import atomic_write
    if args.fake_tasks:
        if not args.fake_weights or args.images or args.eval_images:
            raise SystemExit("error: --fake-tasks goes with --fake-weights and without --images/--eval-images")
        args.images, args.eval_images = write_fake_photos(args.output, args.fake_tasks)
    runs, commands = {}, {}
    for loss in args.losses:
        runs[loss], commands[loss] = [], []
        for seed in args.seeds:
            record, cmds = one_run(args, loss, seed)
            runs[loss].append(record)
            commands[loss] += cmds
            z = " ".join(f"{s} {record['settings'][s]['ZTA']:.3f}" for s in SETTINGS)
            print(f"{loss:<10} seed {seed}: ZTA {z}", flush=True)
    table, winner, score = summarize(runs, args.losses)
    text = markdown(table, winner, score, args, commands)
    print(text)
    record = {"args": vars(args), "winner": winner, "mean": score,
              "table": {l: {s: {m: {"mean": v[0], "sd": v[1]} for m, v in per.items()} for s, per in t.items()}
                        for l, t in table.items()},
              "runs": {l: [{"seed": seed, "settings": r["settings"], "train": shlex.join(commands[l][2 * k]),
                            "eval": shlex.join(commands[l][2 * k + 1])} for k, (seed, r) in
                           enumerate(zip(args.seeds, runs[l]))] for l in args.losses}}

    def write_text(path, content):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(content)
        atomic_write(path, write)
    write_text(os.path.join(args.output, "ablation.md"), text)
    write_text(os.path.join(args.output, "ablation.json"), json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {os.path.join(args.output, 'ablation.md')} and ablation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
