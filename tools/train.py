#!/usr/bin/env python
"""Train a Diff-Plugin Task-Plugin (TPB + SCB) on photo pairs: one CPU, one GPU or many with torchrun.

    python tools/train.py --task deblur --data pairs/ --output runs/deblur          # pairs/input + pairs/gt
    python tools/train.py --task derain --data train.csv --data-root /data --output runs/derain
    python tools/train.py --task deblur --data photos/ --degrade deblur --output runs/deblur-synth
    python tools/train.py --task deblur --data pairs/ --output runs/deblur --resume  # after a stop or crash
    torchrun --nproc_per_node 4 tools/train.py --task deblur --data pairs/ --output runs/x --batch-size 64
    python tools/train.py --task deblur --data photos/ --degrade deblur --output /tmp/try --fake-weights \\
        --steps 20 --resolution 64 --batch-size 2        # CPU-sized: random tiny networks, no weights needed

RUN_DIR (--output) gets <task>.safetensors (the plugin, for tools/sample.py --plugins RUN_DIR),
checkpoints/step-NNNNNN/, log.csv, loss.png, val/step-NNNNNN.png (input | output | gt) and config.json.
Exit status (tools/_cli.py, README): 0 done; 1 failed (unreadable weights, I/O); 2 bad command line or data
(one line, nothing written); 3 the loss became NaN/inf; 130 Ctrl-C, 143 SIGTERM (for these three the last good
checkpoint stays the latest).
Paper: Liu et al., Diff-Plugin (CVPR 2024); recipe of yuhaoliu7456/Diff-Plugin @ 79e12bb train.py, see
minidiff/train/training.py (the step), minidiff/train/trainer.py (DDP, batches), minidiff/train/rundir.py (run
folder, checkpoints, resume), minidiff/train/runlog.py (log, plot), minidiff/train/datasets.py (data).
"""
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # _cli, also when imported by the tests
TASK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
from dataclasses import replace  # noqa: E402 (imports after the sys.path lines)

import torch  # noqa: E402

from _cli import (DTYPES, OneLineParser, UsageError, add_device_flags, add_model_flag,  # noqa: E402
                  default_weights, positive_float, run)
from minidiff.download import base_model_id  # noqa: E402
from minidiff.io.files import listing_hash, sha256_path  # noqa: E402
from minidiff.io.imageio import save_png_atomic  # noqa: E402
from minidiff.io.loading import load_clip_vision, load_stable_diffusion  # noqa: E402
from minidiff.plugin.fake import fake_models  # noqa: E402
from minidiff.plugin.files import save_plugin  # noqa: E402
from minidiff.plugin.plugin import SCB, TASKS, TPB, PluginConfig, TaskPlugin, check_fits  # noqa: E402
from minidiff.train import datasets, rundir, runlog, trainer, training  # noqa: E402
from minidiff.train.lr_schedule import SCHEDULES, LrSchedule  # noqa: E402
from minidiff.train.seeding import derive_seed  # noqa: E402
# settings that define the run: --resume refuses to change them (the rest may change between sessions)
FIXED = ("task", "data_sha256", "degrade", "batch_size", "lr", "scale_lr", "seed", "resolution", "augment",
         "scb_init", "val_pairs", "fake_weights", "lr_scheduler", "lr_warmup_steps")
OFFICIAL_EPOCHS = 100  # train.sh l.30 (--num_train_epochs=100); the default length, converted to updates
LOG_FIELDS = ["step", "loss", "lr", "grad_norm_scb", "grad_norm_tpb", "images_per_s", "epoch", "val_psnr"]


def parse_args(argv=None):
    p = OneLineParser(__doc__, prog="train.py")
    a = p.add_argument
    a("--task", required=True, help="plugin name: one of the 8 official tasks or your own (a-z, 0-9, _ -)")
    a("--data", required=True, help="folder with input/ + gt/, the official CSV, or clean photos (--degrade)")
    a("--data-root", default="", help="folder the CSV's relative paths start from")
    a("--degrade", default=None, help="make each input from its clean photo with this task's degradation")
    a("--output", required=True, help="RUN_DIR: plugin file, checkpoints, log.csv, loss.png, val/, config")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help="optimizer updates (default: --epochs 100 converted to updates)")
    length.add_argument("--epochs", type=int, default=None,
                        help="passes over the training pairs, as updates = epochs x ceil(pairs / global batch); "
                             f"default {OFFICIAL_EPOCHS} (official train.sh) unless --steps is given")
    a("--batch-size", type=int, default=64, help="GLOBAL batch, split over processes and --grad-accum")
    a("--grad-accum", type=int, default=1, help="micro-batches per update on each process")
    a("--allow-repeat", action="store_true",
      help="accept a global batch larger than the training pairs (a photo then repeats within a batch)")
    a("--lr", type=positive_float, default=1e-5, help="constant AdamW learning rate (paper)")
    a("--scale-lr", action="store_true", help="lr x global batch, as the official code always does")
    a("--lr-scheduler", choices=list(SCHEDULES), default="constant",
      help="lr schedule over the updates, diffusers' formulas (official default constant)")
    a("--lr-warmup-steps", type=int, default=500,
      help="linear warm-up updates of constant_with_warmup and cosine (ignored by constant, as officially)")
    a("--seed", type=int, default=42, help="seed of the data order, noises, timesteps, init (official 42)")
    a("--resolution", type=int, default=512, help="photos resized to this square (multiple of 8)")
    a("--augment", action="store_true", help="official paired random crop + horizontal flip (p 0.5 each)")
    a("--checkpoint-every", type=int, default=500, help="write a checkpoint every K steps (and at the end)")
    a("--keep-checkpoints", type=int, default=0, help="keep only the newest K checkpoints (0: keep all)")
    a("--validate-every", type=int, default=500, help="validation picture + PSNR every V steps (0: never)")
    a("--val-pairs", type=int, default=4, help="pairs held out of training for validation")
    a("--val-steps", type=int, default=20, help="UniPC steps of the validation restore")
    a("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    a("--resume-from", default=None, metavar="CHECKPOINT",
      help="continue the run in --output from this checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN)")
    a("--validation-image", nargs="+", default=[], metavar="FILE",
      help="photos without ground truth, restored at each validation into val/step-NNNNNN-photos.png")
    a("--precision", choices=list(DTYPES), default="fp32",
      help="frozen networks' precision; TPB/SCB keep fp32 master weights")
    a("--grad-checkpointing", action="store_true", help="recompute UNet activations in backward (memory)")
    a("--scb-init", choices=["random", "unet"], default="random",
      help="SCB start: official default init, or ControlNet-style copy of the UNet's first level")
    a("--sd", default=None, help="SD 1.x weights (default: checkpoints/ layout of tools/download.py)")
    a("--clip", default=None, help="CLIP ViT-L/14 vision weights (default: checkpoints/ layout)")
    add_model_flag(a)
    a("--fake-weights", action="store_true", help="random tiny networks instead of checkpoints (for trials)")
    add_device_flags(a, dtype=False)
    a("--num-workers", type=int, default=2, help="data loading processes per training process")
    return p.parse_args(argv)


def check_args(args):
    """Every command-line mistake as a UsageError, before anything is read or written."""
    for name in ("steps", "epochs", "batch_size", "grad_accum", "checkpoint_every", "val_steps", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("keep_checkpoints", "validate_every", "val_pairs", "num_workers", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8 (the VAE's factor), got {args.resolution}")
    if not args.task or not set(args.task) <= TASK_NAME_CHARS:
        raise UsageError(f"--task {args.task!r}: use lower-case letters, digits, _ and -")
    if args.degrade is not None and args.degrade not in TASKS:
        raise UsageError(f"--degrade {args.degrade}: unknown task; known: {', '.join(TASKS)}")
    if args.precision == "fp16" and args.device != "cuda":
        raise UsageError("--precision fp16 needs --device cuda; use fp32 or bf16 on the CPU")
    if not args.fake_weights:
        default_weights(args, ROOT, {"sd": "sd14", "clip": "clip"})  # --model: published or small base
        for flag, path in (("--sd", args.sd), ("--clip", args.clip)):
            if not os.path.exists(path):
                raise UsageError(f"{flag} {path}: not found (tools/download.py fetches it; or --fake-weights)")


def load_models(args, dist, dtype):
    """Frozen SD + CLIP vision (eval, no gradients) and a fresh TaskPlugin (fp32, train mode)."""
    if args.fake_weights:
        models = fake_models(  # the same tiny networks as tools/sample.py --fake-weights
            [args.task], with_selector=False, device=dist.device, dtype=dtype)
        sd, clip, heads = models.sd, models.clip_vision, models.plugins[args.task].scb.cfg.heads
    else:
        sd = load_stable_diffusion(args.sd, dtype=dtype, device=dist.device)
        clip = load_clip_vision(args.clip, dtype=dtype, device=dist.device)
        heads = PluginConfig().heads
    for net in (sd.unet, sd.vae, sd.text_encoder, clip):
        net.eval().requires_grad_(False)
    cfg = replace(PluginConfig(), clip_dim=clip.cfg.width, context_dim=sd.unet.cfg.context_dim,
                  channels=sd.unet.cfg.model_channels, heads=heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(args.seed, "init"))  # the same initial plugin on every rank
        plugin = TaskPlugin(args.task, TPB(cfg), SCB(cfg))
    if args.scb_init == "unet":
        try:
            training.init_scb_from_unet(plugin.scb, sd.unet)
        except ValueError as e:  # e.g. the --fake-weights UNet, which has no attention in its first level
            raise UsageError(str(e)) from None
    plugin.to(dist.device).train().requires_grad_(True)
    check_fits(sd, clip, plugin)
    return sd, clip, plugin


def prepare(args):
    """Every check that needs no weights (UsageError), in order: arguments, data listing, run folder, then
    (rank 0, after joining the process group) every image decoded once. Returns what train() needs."""
    check_args(args)
    dist = trainer.setup_distributed(args.device, args.batch_size, args.grad_accum, join=False)
    pairs = datasets.list_pairs(args.data, args.data_root, args.degrade)
    args.degrade, note = datasets.resolve_identical_pairs(pairs, args.task, args.degrade, args.data)
    if note and dist.is_main:
        print(note, flush=True)
    train_pairs, val_pairs = datasets.split_validation(pairs, args.val_pairs, args.seed)
    if args.batch_size > len(train_pairs) and not args.allow_repeat:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(train_pairs)} training pairs "
                         "(each batch would repeat photos); lower it, or add --allow-repeat")
    args.resume = args.resume or args.resume_from is not None
    per_epoch = math.ceil(len(train_pairs) / args.batch_size)  # updates per pass over the training pairs
    if args.steps is None:  # official: max_train_steps = epochs x ceil(batches per epoch / accumulation)
        args.epochs = args.epochs or OFFICIAL_EPOCHS
        args.steps = args.epochs * per_epoch
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "resume_from")}
    settings.update(data_sha256=listing_hash(pairs), data_pairs=len(pairs))
    run = rundir.RunDir(args.output, "plugin", args.task, args.resume, dist)
    run.check(settings, FIXED)
    if run.config and args.lr_scheduler == "cosine" and run.config["settings"].get("steps") != args.steps:
        raise UsageError(f"--resume: the cosine schedule of this run ends at step "
                         f"{run.config['settings'].get('steps')}, not {args.steps}; resume with that length")
    if args.resume_from and not os.path.isdir(args.resume_from):
        named = run.ckpt_dir / args.resume_from  # a bare name, as the official --resume_from_checkpoint
        if not named.is_dir():
            raise UsageError(f"--resume-from {args.resume_from}: no such checkpoint folder")
        args.resume_from = str(named)
    for photo in args.validation_image:
        if not os.path.isfile(photo):
            raise UsageError(f"--validation-image {photo}: no such file")
    trainer.join_process_group(dist)
    trainer.check_on_main(dist, lambda: datasets.check_images(pairs, args.augment, max(1, args.num_workers)))
    trainer.check_on_main(dist, lambda: datasets.check_images([(p, p) for p in args.validation_image]))
    return dist, run, settings, train_pairs, val_pairs


def announce(args, dist, n_train, n_val, lr, tf32):
    """Print the run's plan once (rank 0): pairs, updates, how the global batch splits, lr, precision."""
    fake = "  *** FAKE WEIGHTS: random tiny networks ***" if args.fake_weights else ""
    per_epoch = math.ceil(n_train / args.batch_size)
    length = f"{args.epochs} epochs x {per_epoch} updates" if args.epochs else \
        f"{args.steps / per_epoch:.3g} epochs of {per_epoch} updates"
    per_device = args.batch_size // dist.world_size // args.grad_accum
    how_lr = f"{args.lr:g} x global batch {args.batch_size} (--scale-lr)" if args.scale_lr else "not scaled"
    sched_text = "" if args.lr_scheduler == "constant" else \
        f", {args.lr_scheduler} with {args.lr_warmup_steps} warm-up updates"
    if dist.is_main:
        print(f"train {args.task}: {n_train} pairs (+{n_val} held out), {args.steps} updates "
              f"({length}), global batch {args.batch_size} = {dist.world_size} process(es) x "
              f"{args.grad_accum} accumulation x per-device batch {per_device}, effective lr {lr:g} "
              f"({how_lr}){sched_text}, {args.precision}{' + TF32 matmuls' if tf32 else ''} on {dist.device} "
              f"-> {args.output}{fake}", flush=True)


def optimization(args, run, dist, plugin, lr):
    """AdamW, the fp16 GradScaler (None otherwise) and the lr schedule, restored from the checkpoint with
    --resume; returns them and the last step already done (0 for a new run)."""
    optimizer = training.make_optimizer(plugin, lr)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    schedule = LrSchedule(optimizer, lr, args.lr_scheduler, args.lr_warmup_steps, args.steps)
    ckpt = run.resume_checkpoint(args.resume_from) if args.resume else None  # hash-checked, see trainer
    start = 0 if ckpt is None else ckpt.step
    if ckpt is not None:
        plugin.load_state_dict(ckpt.tensors)
        optimizer.load_state_dict(ckpt.optimizer["adamw"])
        if "lr_schedule" in ckpt.optimizer:  # the schedule the run was planned with (checked in prepare)
            schedule.load_state_dict(ckpt.optimizer["lr_schedule"])
        if scaler is not None and "scaler" in ckpt.optimizer:  # --precision may change on resume
            scaler.load_state_dict(ckpt.optimizer["scaler"])
    if args.resume and dist.is_main:
        print(f"resuming from {ckpt.path}: step {start}" if ckpt else
              f"--resume: no checkpoint in {args.output} yet; starting from step 0", flush=True)
    return optimizer, scaler, schedule, start


def optimizer_state(optimizer, schedule, scaler):
    """What a checkpoint keeps besides the plugin's weights (read back by optimization())."""
    return {"adamw": optimizer.state_dict(), "lr_schedule": schedule.state_dict(),
            **({"scaler": scaler.state_dict()} if scaler else {})}


def training_batches(args, train_pairs, start, dist):
    """Iterator over this process's micro-batches (degraded [B, 3, R, R], clean [B, 3, R, R], n) of the
    updates after `start`; which photos they hold depends on (seed, step) only, so a resume sees the same."""
    data = datasets.PairDataset(train_pairs, args.resolution, args.seed, args.augment, args.degrade)
    batches = trainer.StepBatches(start, args.steps, args.batch_size, args.grad_accum, dist)
    return iter(torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=args.num_workers))


def validate(args, run, step, sd, clip, plugin, val_data):
    """Rank 0: the held-out pairs' sheet (input | output | gt) and the --validation-image photos' sheet,
    written under RUN_DIR/val/; returns {"val_psnr": mean PSNR} ({} without held-out pairs)."""
    row = {}
    if len(val_data):
        shown = [val_data.load(i, 0) for i in range(len(val_data))]
        sheet, row["val_psnr"] = training.validation_sheet(sd, clip, plugin, shown, args.val_steps, args.seed)
        save_png_atomic(sheet, run.path / "val" / f"step-{step:06d}.png")
    if args.validation_image:
        sheet = training.photo_sheet(sd, clip, plugin, args.validation_image, args.resolution,
                                     args.val_steps, args.seed)
        save_png_atomic(sheet, run.path / "val" / f"step-{step:06d}-photos.png")
    return row


def train(args):
    """Train one Task-Plugin: set the run up (resuming if asked), then each update: one step, its log row,
    validation every --validate-every steps and a checkpoint every --checkpoint-every."""
    dist, run, settings, train_pairs, val_pairs = prepare(args)
    lr = args.lr * args.batch_size if args.scale_lr else args.lr  # official: lr x accum x batch x processes
    tf32 = dist.device.type == "cuda"  # TF32 matmuls as the official run (train.sh --allow_tf32)
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    announce(args, dist, len(train_pairs), len(val_pairs), lr, tf32)
    sd, clip, plugin = load_models(args, dist, DTYPES[args.precision])
    if args.grad_checkpointing:
        training.enable_grad_checkpointing(sd.unet)
    optimizer, scaler, schedule, start = optimization(args, run, dist, plugin, lr)
    hashes = {} if args.fake_weights or not dist.is_main else \
        {"sd": sha256_path(args.sd), "clip": sha256_path(args.clip)}
    run.start(settings, effective_lr=lr, tf32_matmul=tf32, weights=hashes)
    log = runlog.CsvLog(run.path / "log.csv", LOG_FIELDS, start, dist)
    loader = training_batches(args, train_pairs, start, dist)
    val_data = datasets.PairDataset(val_pairs, args.resolution, args.seed, False, args.degrade)
    model = trainer.wrap_ddp(training.PluginObjective(sd, clip, plugin), dist)
    latent_shape = (sd.vae.cfg.z_channels, args.resolution // 8, args.resolution // 8)
    # the base's id, e.g. CompVis/stable-diffusion-v1-4
    base = "fake-weights" if args.fake_weights else base_model_id(args.sd)
    plugin_path = run.path / f"{args.task}.safetensors"

    def save_outputs(step):  # rank 0: the plugin file and the loss plot
        save_plugin(plugin, plugin_path, {"base_model": base, "task": args.task, "steps_trained": step})
        runlog.plot_loss(run.path / "log.csv", run.path / "loss.png")

    bar = runlog.progress(args.steps, start, dist)
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        micro = [next(loader) for _ in range(args.grad_accum)]
        loss = training.accumulate_gradients(model, micro, args.seed, step, latent_shape, dist, scaler)
        rundir.check_finite(loss, step, run)  # before the update: the weights stay those of step - 1
        step_lr = schedule.set_for_update(step)
        norm_scb, norm_tpb = training.clip_and_step(plugin, optimizer, scaler)
        row = {"step": step, "loss": loss.item(), "lr": step_lr, "grad_norm_scb": norm_scb,
               "grad_norm_tpb": norm_tpb, "images_per_s": args.batch_size / (time.perf_counter() - t0),
               "epoch": (step * args.batch_size - 1) // len(train_pairs)}
        if args.validate_every and step % args.validate_every == 0 and dist.is_main:
            row.update(validate(args, run, step, sd, clip, plugin, val_data))
        log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.2f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            run.save_checkpoint(step, plugin.state_dict(), optimizer_state(optimizer, schedule, scaler),
                                step * args.batch_size, keep=args.keep_checkpoints)
            if dist.is_main:
                save_outputs(step)
    bar.close()
    log.close()
    if dist.is_main:
        if start >= args.steps:  # nothing left to train: rewrite the outputs of the last step
            save_outputs(start)
        print(f"wrote {plugin_path} (step {max(start, args.steps)})")
    del model  # the DDP wrapper goes before its process group (trainer.cleanup_distributed)
    trainer.cleanup_distributed(dist)
    return 0


def main(argv=None):
    """Train; returns the exit status (tools/_cli.py: errors as one line)."""
    return run(lambda argv: train(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
