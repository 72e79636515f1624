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
Exit status: 0 done; 1 failed (unreadable weights, I/O); 2 bad command line or data (one line, nothing
written); 3 the loss became NaN/inf (the last good checkpoint stays the latest).
Paper: Liu et al., Diff-Plugin (CVPR 2024); recipe of yuhaoliu7456/Diff-Plugin @ 79e12bb train.py, see
minidiff/train/training.py (the step), minidiff/train/trainer.py (run folder, resume, DDP), minidiff/train/datasets.py (data).
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # _cli, also when imported by the tests
TASK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# settings that define the run: --resume refuses to change them (the rest may change between sessions)
FIXED = ("task", "data_sha256", "degrade", "batch_size", "lr", "scale_lr", "seed", "resolution", "augment",
         "scb_init", "val_pairs", "fake_weights")
LOG_FIELDS = ["step", "loss", "lr", "grad_norm_scb", "grad_norm_tpb", "images_per_s", "epoch", "val_psnr"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--task", required=True, help="plugin name: one of the 8 official tasks or your own (a-z, 0-9, _ -)")
    a("--data", required=True, help="folder with input/ + gt/, the official CSV, or clean photos (--degrade)")
    a("--data-root", default="", help="folder the CSV's relative paths start from")
    a("--degrade", default=None, help="make each input from its clean photo with this task's degradation")
    a("--output", required=True, help="RUN_DIR: plugin file, checkpoints, log.csv, loss.png, val/, config")
    a("--steps", type=int, default=10000, help="optimizer updates (the paper gives no count)")
    a("--batch-size", type=int, default=64, help="GLOBAL batch, split over processes and --grad-accum")
    a("--grad-accum", type=int, default=1, help="micro-batches per update on each process")
    a("--lr", type=float, default=1e-5, help="constant AdamW learning rate (paper)")
    a("--scale-lr", action="store_true", help="lr x global batch, as the official code always does")
    a("--seed", type=int, default=42, help="seed of the data order, noises, timesteps, init (official 42)")
    a("--resolution", type=int, default=512, help="photos resized to this square (multiple of 8)")
    a("--augment", action="store_true", help="official paired random crop + horizontal flip (p 0.5 each)")
    a("--checkpoint-every", type=int, default=500, help="write a checkpoint every K steps (and at the end)")
    a("--keep-checkpoints", type=int, default=0, help="keep only the newest K checkpoints (0: keep all)")
    a("--validate-every", type=int, default=500, help="validation picture + PSNR every V steps (0: never)")
    a("--val-pairs", type=int, default=4, help="pairs held out of training for validation")
    a("--val-steps", type=int, default=20, help="UniPC steps of the validation restore")
    a("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    a("--precision", choices=list(PRECISIONS), default="fp32",
      help="frozen networks' precision; TPB/SCB keep fp32 master weights")
    a("--grad-checkpointing", action="store_true", help="recompute UNet activations in backward (memory)")
    a("--scb-init", choices=["random", "unet"], default="random",
      help="SCB start: official default init, or ControlNet-style copy of the UNet's first level")
    a("--sd", default=None, help="SD 1.x weights (default: checkpoints/ layout of tools/download.py)")
    a("--clip", default=None, help="CLIP ViT-L/14 vision weights (default: checkpoints/ layout)")
    a("--fake-weights", action="store_true", help="random tiny networks instead of checkpoints (for trials)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    a("--num-workers", type=int, default=2, help="data loading processes per training process")
    return p.parse_args(argv)


def check_args(args):
    """Every command-line mistake as a UsageError, before anything is read or written."""
    from minidiff.plugin.plugin import TASKS
    from minidiff.train.trainer import UsageError
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "val_steps", "resolution"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("keep_checkpoints", "validate_every", "val_pairs", "num_workers"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8 (the VAE's factor), got {args.resolution}")
    if not args.task or not set(args.task) <= TASK_NAME_CHARS:
        raise UsageError(f"--task {args.task!r}: use lower-case letters, digits, _ and -")
    if args.degrade is not None and args.degrade not in TASKS:
        raise UsageError(f"--degrade {args.degrade}: unknown task; known: {', '.join(TASKS)}")
    if args.precision == "fp16" and args.device != "cuda":
        raise UsageError("--precision fp16 needs --device cuda; use fp32 or bf16 on the CPU")
    if not args.fake_weights:
        from minidiff.download import default_checkpoint_paths
        defaults = default_checkpoint_paths(os.path.join(ROOT, "checkpoints"))
        args.sd, args.clip = args.sd or defaults["sd14"], args.clip or defaults["clip"]
        for flag, path in (("--sd", args.sd), ("--clip", args.clip)):
            if not os.path.exists(path):
                raise UsageError(f"{flag} {path}: not found (tools/download.py fetches it; or --fake-weights)")


def load_models(args, dist, dtype):
    """Frozen SD + CLIP vision (eval, no gradients) and a fresh TaskPlugin (fp32, train mode)."""
    import torch
    from dataclasses import replace
    from minidiff.plugin.plugin import SCB, TPB, PluginConfig, TaskPlugin, check_fits
    from minidiff.errors import UsageError
    from minidiff.train.seeding import derive_seed
    from minidiff.train.training import init_scb_from_unet
    if args.fake_weights:
        from minidiff.plugin.fake import fake_models  # the same tiny networks as tools/sample.py --fake-weights
        models = fake_models([args.task], with_selector=False, device=dist.device, dtype=dtype)
        sd, clip, heads = models.sd, models.clip_vision, models.plugins[args.task].scb.cfg.heads
    else:
        from minidiff.io.loading import load_clip_vision, load_stable_diffusion
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
            init_scb_from_unet(plugin.scb, sd.unet)
        except ValueError as e:  # e.g. the --fake-weights UNet, which has no attention in its first level
            raise UsageError(str(e)) from None
    plugin.to(dist.device).train().requires_grad_(True)
    check_fits(sd, clip, plugin)
    return sd, clip, plugin


def prepare(args):
    """Every check that needs no weights (UsageError), in order: arguments, data listing, run folder, then
    (rank 0, after joining the process group) every image decoded once. Returns what train() needs."""
    from minidiff.train import datasets, trainer
    check_args(args)
    dist = trainer.setup_distributed(args.device, args.batch_size, args.grad_accum, join=False)
    pairs = datasets.list_pairs(args.data, args.data_root, args.degrade)
    train_pairs, val_pairs = datasets.split_validation(pairs, args.val_pairs, args.seed)
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    settings.update(data_sha256=datasets.listing_hash(pairs), data_pairs=len(pairs))
    run = trainer.RunDir(args.output, "plugin", args.task, args.resume, dist)
    run.check(settings, FIXED)
    trainer.join_process_group(dist)
    trainer.check_on_main(dist, lambda: datasets.check_images(pairs, args.augment, max(1, args.num_workers)))
    return dist, run, settings, train_pairs, val_pairs


def train(args):
    import torch
    from minidiff.train import datasets, trainer, training
    from minidiff.download import base_model_id
    from minidiff.io.files import sha256_path
    from minidiff.io.imageio import save_png_atomic
    from minidiff.plugin.files import save_plugin
    dist, run, settings, train_pairs, val_pairs = prepare(args)
    lr = args.lr * args.batch_size if args.scale_lr else args.lr  # official: lr x accum x batch x processes
    fake = "  *** FAKE WEIGHTS: random tiny networks ***" if args.fake_weights else ""
    print(f"train {args.task}: {len(train_pairs)} pairs (+{len(val_pairs)} held out), {args.steps} steps, "
          f"global batch {args.batch_size} = {dist.world_size} process(es) x {args.grad_accum} x "
          f"{args.batch_size // dist.world_size // args.grad_accum}, lr {lr:g}, {args.precision} on "
          f"{dist.device} -> {args.output}{fake}", flush=True)
    sd, clip, plugin = load_models(args, dist, getattr(torch, PRECISIONS[args.precision]))
    if args.grad_checkpointing:
        training.enable_grad_checkpointing(sd.unet)
    optimizer = training.make_optimizer(plugin, lr)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    ckpt = run.load_checkpoint(run.latest_checkpoint()) if args.resume else None
    start = 0 if ckpt is None else ckpt.step
    if ckpt is not None:
        plugin.load_state_dict(ckpt.tensors)
        optimizer.load_state_dict(ckpt.optimizer["adamw"])
        if scaler is not None and "scaler" in ckpt.optimizer:  # --precision may change on resume
            scaler.load_state_dict(ckpt.optimizer["scaler"])
    if args.resume and dist.is_main:
        print(f"resuming from {ckpt.path}: step {start}" if ckpt else
              f"--resume: no checkpoint in {args.output} yet; starting from step 0", flush=True)
    hashes = {} if args.fake_weights or not dist.is_main else \
        {"sd": sha256_path(args.sd), "clip": sha256_path(args.clip)}
    run.start(settings, effective_lr=lr, weights=hashes)
    log = trainer.CsvLog(run.path / "log.csv", LOG_FIELDS, start, dist)
    data = datasets.PairDataset(train_pairs, args.resolution, args.seed, args.augment, args.degrade)
    val_data = datasets.PairDataset(val_pairs, args.resolution, args.seed, False, args.degrade)
    batches = trainer.StepBatches(start, args.steps, args.batch_size, args.grad_accum, dist)
    loader = iter(torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=args.num_workers))
    model = trainer.wrap_ddp(training.PluginObjective(sd, clip, plugin), dist)
    latent_shape = (sd.vae.cfg.z_channels, args.resolution // 8, args.resolution // 8)
    # the base's id, e.g. CompVis/stable-diffusion-v1-4
    base = "fake-weights" if args.fake_weights else base_model_id(args.sd)
    plugin_path = run.path / f"{args.task}.safetensors"

    def save_outputs(step):  # rank 0: the plugin file and the loss plot
        save_plugin(plugin, plugin_path, {"base_model": base, "task": args.task, "steps_trained": step})
        trainer.plot_loss(run.path / "log.csv", run.path / "loss.png")

    bar = trainer.progress(args.steps, start, dist)
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        micro = [next(loader) for _ in range(args.grad_accum)]
        loss = training.accumulate_gradients(model, micro, args.seed, step, latent_shape, dist, scaler)
        trainer.check_finite(loss, step, run)  # before the update: the weights stay those of step - 1
        norm_scb, norm_tpb = training.clip_and_step(plugin, optimizer, scaler)
        row = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm_scb": norm_scb,
               "grad_norm_tpb": norm_tpb, "images_per_s": args.batch_size / (time.perf_counter() - t0),
               "epoch": (step * args.batch_size - 1) // len(train_pairs)}
        if val_pairs and args.validate_every and step % args.validate_every == 0 and dist.is_main:
            shown = [val_data.load(i, 0) for i in range(len(val_pairs))]
            sheet, row["val_psnr"] = training.validation_sheet(sd, clip, plugin, shown, args.val_steps,
                                                                args.seed)
            save_png_atomic(sheet, run.path / "val" / f"step-{step:06d}.png")
        log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.2f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            state = {"adamw": optimizer.state_dict(), **({"scaler": scaler.state_dict()} if scaler else {})}
            run.save_checkpoint(step, plugin.state_dict(), state, step * args.batch_size,
                                keep=args.keep_checkpoints)
            if dist.is_main:
                save_outputs(step)
    bar.close()
    log.close()
    if dist.is_main:
        if start >= args.steps:  # nothing left to train: rewrite the outputs of the last step
            save_outputs(start)
        print(f"wrote {plugin_path} (step {max(start, args.steps)})")
    trainer.cleanup_distributed(dist)
    return 0


def main(argv=None):
    from _cli import training_main  # exit codes 0 / 1 / 2 / 3 as its docstring says
    return training_main(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
