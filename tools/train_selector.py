#!/usr/bin/env python
"""Train the Diff-Plugin Plugin-Selector (paper eq. 6) on photos of each task and the instruction corpus.

    python tools/train_selector.py --plugins checkpoints/diff-plugin --images selector_images/ \\
        --output runs/selector --cache cache/selector --export-official
    python tools/train_selector.py --plugins checkpoints/diff-plugin --images selector_images/ \\
        --output runs/selector --resume                    # after a stop or crash: continues bit-identically
    python tools/train_selector.py --fake-weights --steps 50 --output /tmp/sel   # CPU-sized, no weights

--images holds one sub-folder of photos per task (derain/, face/, a new task's name, ...); each task needs a
plugin in --plugins and sentences in the corpus (--instructions; default: the one shipped in
minidiff/data/instructions.json; a new task = a new key there). Only the corpus' train part is used.
RUN_DIR (--output) gets selector.safetensors (for tools/sample.py --selector), PromptTunner.pt with
--export-official (the official demo.py loads it), checkpoints/step-NNNNNN/, log.csv, loss.png, config.json.
--fake-weights: random tiny networks; without --images, 8 random photos per corpus task.
--loss decoupled|infonce|supcon: the readings of eq. 6; sigmoid (the default, by tools/bench/selector_ablation.py
on the small family, README "Which loss"): the selection rule (score > 0) trained directly;
logit_scale is kept out of AdamW's weight decay.
Exit status (tools/_cli.py, README): 0 done; 1 failed (unreadable weights, I/O); 2 bad command line or data
(one line); 3 the loss became NaN/inf; 130 Ctrl-C, 143 SIGTERM (the last checkpoint stays the latest).
Paper: Liu et al., Diff-Plugin (CVPR 2024) sec. 3.4; see minidiff/train/selector_training.py.
"""
import hashlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # _cli, also when imported by the tests
from _cli import (OneLineParser, UsageError, add_device_flags, add_model_flag, default_weights,  # noqa: E402
                  int_range, positive_float, run)
from minidiff.io.files import listing_hash  # noqa: E402
from minidiff.plugin.files import export_official_selector, load_selector, save_selector  # noqa: E402
from minidiff.plugin.selector import PluginSelector  # noqa: E402
from minidiff.train import instructions, rundir, runlog, selector_training as st, trainer  # noqa: E402
from minidiff.train.seeding import derive_seed  # noqa: E402

# settings that define the run: --resume refuses to change them (--steps and the rest may change)
FIXED = ("tasks", "images_sha256", "instructions_sha256", "batch_size", "negatives", "lr", "seed", "init",
         "fake_weights", "loss")
LOG_FIELDS = ["step", "loss", "logit_scale", "positive_cos", "negative_cos"]
FAKE_PHOTOS = 8  # random photos per task for --fake-weights without --images


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="train_selector.py")
    a = p.add_argument
    a("--output", required=True, help="RUN_DIR: selector file, checkpoints, log.csv, loss.png, config.json")
    a("--images", help="folder with one sub-folder of photos per task (the visual pseudo-labels)")
    a("--plugins", help="folder of plugins (official <task>/ folders or <task>.safetensors; default: "
                        "checkpoints/ layout of tools/download.py)")
    a("--instructions", help="instruction corpus JSON (default: minidiff/data/instructions.json)")
    a("--cache", help="folder for the frozen CLIP/TPB/text features (computed once, reused by later runs)")
    a("--steps", type=int_range(1), default=5000, help="optimizer updates (paper: not given; 5000 x 8 = one pass "
                                              "over its 8 x 5,000 photos)")
    a("--batch-size", type=int_range(1), default=8, help="photos per update, one positive instruction each (paper: 8)")
    a("--negatives", type=int_range(1), default=7, help="negative instructions per photo, N of eq. 6 (paper: 7)")
    a("--lr", type=positive_float, default=1e-5, help="constant AdamW learning rate (paper: 1e-5)")
    a("--loss", choices=list(st.LOSSES), default=st.DEFAULT_LOSS,
      help="reading of eq. 6: decoupled (literal: each photo's own texts, positive out of the denominator), "
           "infonce (all texts of the batch, positive in, same-task texts masked), supcon (all texts of "
           "the batch, same-task texts are positives); or sigmoid (not eq. 6: every plugin's score on each "
           "photo against every text, binary label 'asks for it', the selection rule score > 0 trained "
           "directly; the default, by the README's ablation on the small family)")
    a("--seed", type=int, default=0, help="seed of the initial weights, the text combinations, the batches")
    a("--init", help="start from this selector (official PromptTunner.pt or minidiff .safetensors)")
    a("--checkpoint-every", type=int_range(1), default=500, help="write a checkpoint every K steps (and at the end)")
    a("--keep-checkpoints", type=int_range(0), default=0, help="keep only the newest K checkpoints (0: keep all)")
    a("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    a("--export-official", action="store_true",
      help="also write RUN_DIR/PromptTunner.pt, the official format")
    a("--sd", help="SD 1.x weights, for its CLIP text encoder (default: checkpoints/ layout)")
    a("--clip", help="CLIP ViT-L/14 vision weights (default: checkpoints/ layout)")
    add_model_flag(a)
    a("--fake-weights", action="store_true",
      help="random tiny networks instead of checkpoints (trials, tests)")
    add_device_flags(a, dtype=False)
    return p.parse_args(argv)


def check_args(args):
    """Command-line mistakes as UsageError, before anything is read; fills the default weight paths (the
    parser already refused values out of range)."""
    if args.fake_weights:
        return
    default_weights(args, ROOT, {"sd": "sd14", "clip": "clip", "plugins": "plugins"})  # --model
    for flag, path in (("--sd", args.sd), ("--clip", args.clip), ("--plugins", args.plugins)):
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path}: not found (tools/download.py fetches it, or --fake-weights)")


def prepare(args, run_check):
    """Corpus, tasks, photos, frozen features: everything before the first update."""
    corpus_file = args.instructions or instructions.CORPUS
    try:
        corpus = instructions.load_corpus(corpus_file)
    except (ValueError, OSError) as e:  # not JSON, not a corpus, unreadable: name the file
        raise UsageError(f"--instructions {corpus_file}: {e}") from None
    try:
        tasks = st.resolve_tasks(corpus, args.images, args.plugins, args.fake_weights)
        photos = (st.task_photos(args.images, tasks) if args.images else
                  st.fake_photos(tasks, FAKE_PHOTOS, derive_seed(args.seed, "fake-photos")))
        texts = st.training_texts(corpus.part("train").restrict(tasks), args.seed)
        st.check_texts(texts, args.negatives)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with open(corpus_file, "rb") as f:
        corpus_hash = hashlib.sha256(f.read()).hexdigest()
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    listing = [(task, photo) for task, paths in photos.items() for photo in paths]
    settings.update(tasks=tasks, images_sha256=listing_hash(listing, labels=1), instructions_sha256=corpus_hash)
    run_check(settings)
    n_photos = sum(map(len, photos.values()))
    print(f"train selector: {len(tasks)} tasks ({', '.join(tasks)}), {n_photos} photos, "
          f"{len(texts.texts)} training texts; {args.steps} steps of {args.batch_size} photos x "
          f"(1 + {args.negatives}) texts, {args.loss} loss, lr {args.lr:g} -> {args.output}"
          + ("  *** FAKE WEIGHTS: random tiny networks ***" if args.fake_weights else ""), flush=True)
    return tasks, photos, texts, settings


def frozen_inputs(args, tasks, photos, texts, device):
    """The frozen features, computed once (or read from --cache): (photo features [n, tasks, D] on device,
    {task: photo rows}, text table [n_texts, D] on device, {name: weight file})."""
    models, cache_names, files = st.load_frozen(tasks, args.fake_weights, args.sd, args.clip, args.plugins,
                                                device)
    photo_feats, per_task, text_feats = st.frozen_features(models, photos, [t for t, _ in texts.texts],
                                                           args.cache, cache_names)
    del models  # the frozen networks are no longer needed: everything below runs on the features
    text_table = torch.stack([text_feats[t] for t, _ in texts.texts]).to(device)  # [n_texts, D]
    return photo_feats.to(device), per_task, text_table, files


def initial_selector(args, width, device):
    """The selector to train (train mode, fp32): --init's, or a fresh one seeded by (seed, "selector-init")."""
    if args.init:
        selector = load_selector(args.init, device=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(args.seed, "selector-init"))
            selector = PluginSelector(width)
    if selector.proj_v.in_features != width:
        raise UsageError(f"--init {args.init}: width {selector.proj_v.in_features}, features {width}")
    return selector.to(device).train().requires_grad_(True)


def resume(args, run, selector, optimizer):
    """With --resume: the latest checkpoint's weights and optimizer state; returns the step to start after."""
    ckpt = run.load_checkpoint(run.latest_checkpoint()) if args.resume else None
    if ckpt is not None:
        selector.load_state_dict(ckpt.tensors)
        optimizer.load_state_dict(ckpt.optimizer)
        print(f"resuming from {ckpt.path}: step {ckpt.step}", flush=True)
    elif args.resume:
        print(f"--resume: no checkpoint in {args.output} yet; starting from step 0", flush=True)
    return 0 if ckpt is None else ckpt.step


def train(args):
    check_args(args)
    dist = trainer.setup_distributed(args.device)
    if dist.world_size > 1:
        raise UsageError("train_selector runs in one process (the selector is small), not under torchrun")
    run = rundir.RunDir(args.output, "selector", None, args.resume, dist)
    tasks, photos, texts, settings = prepare(args, lambda s: run.check(s, FIXED))
    photo_feats, per_task, text_table, files = frozen_inputs(args, tasks, photos, texts, dist.device)
    selector = initial_selector(args, text_table.shape[-1], dist.device)
    optimizer = st.make_optimizer(selector, args.lr)  # AdamW defaults (paper); no decay on logit_scale
    start = resume(args, run, selector, optimizer)
    run.start(settings, weights={"fake": True} if args.fake_weights else
              {k: os.path.abspath(v) for k, v in files.items()}, texts=len(texts.texts))
    log = runlog.CsvLog(run.path / "log.csv", LOG_FIELDS, start, dist)
    meta = {"tasks": ",".join(tasks), "fake_weights": args.fake_weights}

    def write_outputs(step):
        save_selector(selector, run.path / "selector.safetensors", {**meta, "steps_trained": step})
        if args.export_official:
            export_official_selector(selector, run.path / "PromptTunner.pt")
        runlog.plot_loss(run.path / "log.csv", run.path / "loss.png")

    bar = runlog.progress(args.steps, min(start, args.steps), dist)
    for step in range(start + 1, args.steps + 1):
        batch = st.draw_batch(args.seed, step, per_task, texts, args.batch_size, args.negatives)
        if args.loss == "sigmoid":
            visual = photo_feats[batch.photos]  # [B, P, D]: each photo through every plugin
        else:
            visual = photo_feats[batch.photos, batch.tasks]  # [B, D]: each photo through its own task's plugin
        loss, cos = st.batch_loss(selector, visual, text_table[batch.texts], batch.indicator, args.loss,
                                  batch.same, batch.asks, batch.tasks)  # as --loss says
        rundir.check_finite(loss.detach(), step, run)
        st.update(selector, optimizer, loss)
        log.write({"step": step, "loss": loss.item(), "logit_scale": selector.logit_scale.item(),
                   "positive_cos": cos[:, 0].mean().item(), "negative_cos": cos[:, 1:].mean().item()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            run.save_checkpoint(step, selector.state_dict(), optimizer.state_dict(), step * args.batch_size,
                                keep=args.keep_checkpoints)
            write_outputs(step)
    bar.close()
    log.close()
    if start >= args.steps:  # nothing left to train: rewrite the outputs of the last step
        write_outputs(start)
    print(f"wrote {run.path / 'selector.safetensors'} (step {max(start, args.steps)})")
    return 0


def main(argv=None):
    """Train; returns the exit status (tools/_cli.py: errors as one line)."""
    return run(lambda argv: train(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
