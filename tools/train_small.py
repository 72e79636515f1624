#!/usr/bin/env python
"""Train minidiff's small model family from nothing on a CPU: VAE, text tower, UNet, Task-Plugins, selector.

    python tools/small_data.py --output data/small                 # the photos (package registries only)
    python tools/train_small.py --data data/small --output runs/small --ship checkpoints/small
    python tools/train_small.py --data data/small --output runs/small --resume      # after a stop or kill
    python tools/train_small.py --data examples --output /tmp/small --quick         # CI-sized, end to end

Stages, in order, each a training run of its own under --output with log.csv, loss.png and checkpoints that
--resume continues bit-identically (a finished stage is skipped):
    vae/       SD's AutoencoderKL at reduced widths on random 64 px crops (minidiff.train.small.vae_loss)
    latents    the VAE posterior of random 128 px crops; the latent scale = 1 / std (SD's rule for 0.18215)
    decoder/   the VAE's decoder trained on, its encoder frozen (SD's ft-MSE way): the latents stay valid
    text/      the CLIP text tower, trained to name the tasks of the instruction corpus's training sentences
    words/     the text tower trained on with WordNet's task words swapped into those sentences, its output
               for "" (the UNet's context) held in place
    unet/      SD's UNet at reduced widths, epsilon prediction on SD's DDPM schedule, null context
    base/      sd.safetensors (SD single-file layout, latent scale in its metadata) + clip_vision.safetensors
    plugins/   one Task-Plugin per task: tools/train.py --degrade TASK on the small base
    selector/  the Plugin-Selector: tools/train_selector.py on degraded photos of each task; its held-out
               figures (tools/eval_selector.py) in selector/heldout.json
--ship DIR then writes the family, fp16, with manifest.json (sha256 of every file) into DIR.
--start-from DIR (a shipped family, e.g. checkpoints/small) begins a new --output with that family's VAE,
latent scale, text tower, UNet and plugins as finished stages (fp16 -> fp32), so that the stages a newer
recipe adds or changes run on top of them without retraining the rest.
Exit status as every tool (README): 0 done, 1 failed, 2 bad command line or data, 3 non-finite loss,
130 Ctrl-C, 143 SIGTERM.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import train as train_tool  # noqa: E402  (tools/train.py: the Task-Plugin stage)
import train_selector as selector_tool  # noqa: E402  (tools/train_selector.py: the selector stage)
import eval_selector as eval_selector_tool  # noqa: E402  (tools/eval_selector.py: its held-out figures)
from _cli import OneLineParser, check_writable, int_range, run  # noqa: E402
from minidiff.errors import UsageError  # noqa: E402
from minidiff.io.files import atomic_write, save_json_atomic, sha256_file  # noqa: E402
from minidiff.io.imageio import ImageError, load_image  # noqa: E402
from minidiff.plugin.files import load_plugin, load_selector, save_plugin, save_selector  # noqa: E402
from minidiff.plugin.plugin import TASKS  # noqa: E402
from minidiff.train import rundir, small, trainer  # noqa: E402
from minidiff.train.degrade import degrade  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The recipe: step counts sized from measured step times on a 2-core CPU (README, "Train the whole stack
# on a laptop"); quick = the same code paths at tiny sizes, for CI.
RECIPES = {
    "full": dict(size=small.SIZE, vae_steps=3000, vae_batch=16, vae_crop=small.VAE_CROP, vae_lr=2e-4,
                 decoder_steps=3000, decoder_lr=1e-4,
                 crops_per_photo=24, text_steps=1500, text_batch=64, text_lr=1e-3, words_steps=1500, words_lr=5e-4,
                 unet_steps=3000, unet_batch=16, unet_lr=2e-4, every=250,
                 tasks=TASKS, plugin_steps=800, plugin_batch=8, plugin_lr=1e-3, val_pairs=4,
                 selector_photos=24, selector_steps=1500, selector_lr=5e-4, selector_loss="sigmoid"),
    "quick": dict(size=64, vae_steps=3, vae_batch=2, vae_crop=64, vae_lr=2e-4, decoder_steps=2, decoder_lr=1e-4,
                  crops_per_photo=2, text_steps=3, text_batch=8, text_lr=1e-3, words_steps=2, words_lr=5e-4,
                  unet_steps=3, unet_batch=4, unet_lr=2e-4, every=2,
                  tasks=small.QUICK_TASKS, plugin_steps=2, plugin_batch=2, plugin_lr=2e-4, val_pairs=1,
                  selector_photos=4, selector_steps=3, selector_lr=5e-4, selector_loss="sigmoid"),
}
STAGES = ("vae", "latents", "decoder", "text", "words", "unet", "base", "plugins", "selector")


def parse_args(argv=None):
    p = OneLineParser(__doc__)
    a = p.add_argument
    a("--data", required=True, help="tools/small_data.py's folder (its train split), or a folder of photos")
    a("--output", required=True, help="recipe folder: one sub-folder per stage")
    a("--ship", help="write the finished family here (fp16, manifest.json), e.g. checkpoints/small")
    a("--quick", action="store_true", help="tiny sizes and step counts: proves the recipe runs (CI)")
    a("--until", choices=STAGES, default=STAGES[-1], help="stop after this stage (the earlier ones run first)")
    a("--resume", action="store_true", help="continue the recipe in --output (finished stages are skipped)")
    a("--start-from", help="a shipped family (e.g. checkpoints/small): its VAE, latent scale, text tower, UNet "
                           "and plugins become this new --output's finished stages; the rest runs on top")
    a("--seed", type=int_range(0), default=0, help="seed of every initialisation, crop and noise")
    a("--threads", type=int_range(0), default=0, help="torch threads (0: torch's default, all cores)")
    a("--jobs", type=int_range(1), default=1, help="Task-Plugins trained at once (one torch thread each)")
    return p.parse_args(argv)


def training_photos(data):
    """Paths of the training photos: the train split of a tools/small_data.py folder, or every image of a
    plain folder. One-line UsageError when there are none or the folder is missing."""
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data {data}: no such folder (python tools/small_data.py --output {data} makes it)")
    if (root / "manifest.json").is_file():
        from minidiff.train.small_data import photo_paths
        return [str(p) for p in photo_paths(root, "train")]
    paths = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise UsageError(f"--data {data}: no photos ({', '.join(IMAGE_EXTS)})")
    return paths


def open_photos(paths, min_side):
    """Decode every photo once, before any training: an unreadable one is refused in one line."""
    for p in paths:
        try:
            load_image(p)
        except ImageError as e:
            raise UsageError(str(e)) from None
    return small.load_photos(paths, min_side)


def stage_run(out, name, resume, settings):
    """The RunDir of one stage, checked and started (config.json written)."""
    dist = trainer.Dist()
    run = rundir.RunDir(out / name, "small-" + name, "family", resume and (out / name).exists(), dist)
    run.check(settings, fixed=tuple(k for k in settings if not k.endswith("_steps")))  # steps may grow
    run.start(settings)
    return run, dist


def stage_vae(out, photos, r, args):
    """The VAE on random crops; returns it (eval). vae/vae.safetensors marks the stage done."""
    vae = small.new_vae(args.seed)
    done = out / "vae" / "vae.safetensors"
    if done.exists():
        return small.load_net(vae, done)
    settings = {k: r[k] for k in ("vae_steps", "vae_batch", "vae_crop", "vae_lr")} | {"seed": args.seed}
    run, dist = stage_run(out, "vae", args.resume, settings)
    def batch_loss(step):
        numbers = range((step - 1) * r["vae_batch"], step * r["vae_batch"])
        images, noise = small.vae_batch(photos, numbers, r["vae_crop"], args.seed)
        return small.vae_loss(vae, images, noise)

    small.fit(run, vae, batch_loss, steps=r["vae_steps"], lr=r["vae_lr"], every=r["every"], dist=dist,
              fields=("step", "loss", "l1", "grad", "kl"), desc="vae")
    small.save_net(vae, done)
    return vae


def stage_decoder(out, vae, photos, r, args):
    """The VAE's decoder trained on with its encoder frozen, as SD's own decoder was (sd-vae-ft-mse): the
    posterior, hence the latents and everything trained on them, stays as it was; the same loss, the stream
    of crops continues where the vae stage's ended, the lr falls linearly to 0 (at a constant lr the held-out
    PSNR swings by 0.3 dB from one checkpoint to the next). decoder/vae.safetensors marks the stage done."""
    done = out / "decoder" / "vae.safetensors"
    if done.exists():
        return small.load_net(vae, done)
    settings = {k: r[k] for k in ("decoder_steps", "decoder_lr", "vae_batch", "vae_crop")} | {"seed": args.seed}
    run, dist = stage_run(out, "decoder", args.resume, settings)
    for name, p in vae.named_parameters():  # only the decoder side learns: post_quant_conv + decoder
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    first = r["vae_steps"] * r["vae_batch"]  # the vae stage drew sample numbers 0 .. first - 1

    def batch_loss(step):
        numbers = range(first + (step - 1) * r["vae_batch"], first + step * r["vae_batch"])
        images, noise = small.vae_batch(photos, numbers, r["vae_crop"], args.seed)
        return small.vae_loss(vae, images, noise)

    small.fit(run, vae, batch_loss, steps=r["decoder_steps"], lr=r["decoder_lr"], every=r["every"], dist=dist,
              fields=("step", "loss", "l1", "grad", "kl"), desc="decoder", decay=True)
    vae.requires_grad_(False)
    small.save_net(vae, done)
    return vae


def check_outputs(args, out):
    """One line, before anything is trained, for an --output / --ship / --start-from that cannot work."""
    check_writable(out)
    if args.ship:
        check_writable(args.ship)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise UsageError(f"--output {out} already holds a recipe; add --resume to continue it "
                         "or choose another --output")
    if args.start_from and args.resume:
        raise UsageError("--start-from begins a new --output; --resume continues one (use one of them)")
    if args.start_from:
        check_family(args.start_from)


def check_family(family):
    """--start-from's folder must be a shipped family whose files match its manifest: else one line."""
    from minidiff.errors import CheckpointError
    from minidiff.family import verify_small
    try:
        verify_small(family)
    except CheckpointError as e:
        raise UsageError(f"--start-from {family}: {e}") from None


def start_from(out, family):
    """--start-from: a shipped family's VAE, text tower and UNet (fp16 -> fp32) as the finished vae, text and
    unet stages of `out`, its latent scale as the latents stage (that run's latents are not shipped: only
    their scale is needed once the UNet is trained), its plugins as the finished plugins stage."""
    from minidiff.family import small_paths
    from minidiff.io.loading import load_stable_diffusion
    paths = small_paths(family)
    sd = load_stable_diffusion(paths["sd"], dtype=torch.float32)
    for net, name in ((sd.vae, "vae/vae.safetensors"), (sd.text_encoder, "text/text.safetensors"),
                      (sd.unet, "unet/unet.safetensors")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        small.save_net(net, out / name)
    empty = torch.zeros(0, 4, 1, 1)
    meta = {"latent_scale": repr(sd.vae.cfg.latent_scale), "start_from": str(family)}
    atomic_write(out / "latents.safetensors", lambda tmp: save_file({"mean": empty, "logvar": empty}, tmp,
                                                                    metadata=meta))
    (out / "base" / "plugins").mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(paths["plugins"]).glob("*.safetensors")):
        plugin = load_plugin(str(path), dtype=torch.float32)
        save_plugin(plugin, out / "base" / "plugins" / path.name, plugin.metadata)
    print(f"start from {family}: vae, latent scale {sd.vae.cfg.latent_scale:.5f}, text, unet and "
          f"{len(list((out / 'base' / 'plugins').iterdir()))} plugins taken as finished stages", flush=True)


def stage_latents(out, vae, photos, r, args):
    """Posterior mean/log-variance of random crops, and the latent scale; latents.safetensors."""
    path = out / "latents.safetensors"
    if not path.exists():
        with torch.no_grad():
            mean, logvar = small.encode_crops(vae, photos, r["crops_per_photo"], r["size"], args.seed)
        scale = small.latent_scale(mean, logvar, args.seed)
        atomic_write(path, lambda tmp: save_file({"mean": mean, "logvar": logvar}, tmp,
                                                 metadata={"latent_scale": repr(scale)}))
        print(f"latents: {len(mean)} crops of {r['size']} px, latent scale {scale:.5f}", flush=True)
    return small.load_latents(path)


def stage_text(out, text, r, args):
    """The CLIP text tower (from its random seeded start) trained to name the tasks of the corpus's training
    sentences and of random multi-task combinations of them (minidiff.train.small.TaskNamer); its held-out
    exact task-set accuracy on the test sentences in text/heldout.json. text/text.safetensors marks it done."""
    from minidiff.models.tokenizer import CLIPTokenizer
    from minidiff.train.instructions import load_corpus
    done = out / "text" / "text.safetensors"
    if done.exists():
        return small.trained_text_tower(done)
    corpus, tokenizer = load_corpus(), CLIPTokenizer()
    sentences, labels = small.text_examples(corpus.part("train"), args.seed)
    ids = tokenizer(sentences)  # [N, 77]
    settings = {k: r[k] for k in ("text_steps", "text_batch", "text_lr")} | {"seed": args.seed,
                                                                            "sentences": len(sentences)}
    run, dist = stage_run(out, "text", args.resume, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        namer = small.TaskNamer(text.requires_grad_(True), corpus.tasks)

    def batch_loss(step):
        return small.text_loss(namer, ids, labels, r["text_batch"], args.seed, step)

    small.fit(run, namer, batch_loss, steps=r["text_steps"], lr=r["text_lr"], every=r["every"], dist=dist,
              fields=("step", "loss", "exact"), desc="text")
    return finish_text_stage(out / "text", namer, corpus, tokenizer, ids, labels, args)


def finish_text_stage(folder, namer, corpus, tokenizer, ids, labels, args, **extra):
    """The end of the text and words stages: exact task-set naming on the training sentences (ids, labels) and
    the corpus' test part in <folder>/heldout.json (with `extra` figures), the tower in <folder>/text.safetensors
    (which marks the stage done); returns the tower (eval, frozen)."""
    test, test_labels = small.text_examples(corpus.part("test"), args.seed + 1, combinations=200)
    accuracy = {"train": small.task_naming_accuracy(namer, ids, labels),
                "heldout": small.task_naming_accuracy(namer, tokenizer(test), test_labels)}
    save_json_atomic({"sentences": len(test), **{k: round(v, 4) for k, v in accuracy.items()}, **extra},
                     folder / "heldout.json")
    print(f"{folder.name}: exact task sets named, training sentences {accuracy['train']:.3f}, held-out "
          f"{accuracy['heldout']:.3f}" + "".join(f"; {k} {v}" for k, v in extra.items()), flush=True)
    small.save_net(namer.text, folder / "text.safetensors")
    return namer.text.eval().requires_grad_(False)


def stage_words(out, text, r, args):
    """The text tower trained on from the text stage's, with WordNet's task words swapped into the corpus's
    training sentences (minidiff.train.small.words_loss), its output for "" anchored to what it was: the UNet
    is trained (or was, with --start-from) on that output. Held-out naming in words/heldout.json, as the text
    stage's; words/text.safetensors marks the stage done."""
    from minidiff.models.tokenizer import CLIPTokenizer
    from minidiff.train.instructions import load_corpus
    done = out / "words" / "text.safetensors"
    if done.exists():
        return small.trained_text_tower(done)
    corpus, tokenizer, words = load_corpus(), CLIPTokenizer(), small.load_task_words()
    sentences, labels = small.text_examples(corpus.part("train"), args.seed)
    null_target = small.null_context(text).detach()  # [1, 77, width]: the context the UNet sees
    settings = {k: r[k] for k in ("words_steps", "text_batch", "words_lr")} | {
        "seed": args.seed, "sentences": len(sentences), "words": sum(map(len, words.values()))}
    run, dist = stage_run(out, "words", args.resume, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        namer = small.TaskNamer(text.requires_grad_(True), corpus.tasks)  # a fresh head, the text stage's tower

    def batch_loss(step):
        return small.words_loss(namer, sentences, labels, corpus.tasks, words, tokenizer, r["text_batch"],
                                args.seed, step, null_target)

    small.fit(run, namer, batch_loss, steps=r["words_steps"], lr=r["words_lr"], every=r["every"], dist=dist,
              fields=("step", "loss", "exact", "anchor"), desc="words")
    drift = float((small.null_context(namer.text) - null_target).norm() / null_target.norm())  # relative L2
    return finish_text_stage(out / "words", namer, corpus, tokenizer, tokenizer(sentences), labels, args,
                             null_context_relative_change=round(drift, 6))


def stage_unet(out, latents, context, r, args):
    """The UNet on the latents with the null context; unet/unet.safetensors marks the stage done."""
    mean, logvar, scale = latents
    unet = small.new_unet(args.seed)
    done = out / "unet" / "unet.safetensors"
    if done.exists():
        return small.load_net(unet, done)
    settings = {k: r[k] for k in ("unet_steps", "unet_batch", "unet_lr")} | {"seed": args.seed,
                                                                            "latents": len(mean)}
    run, dist = stage_run(out, "unet", args.resume, settings)

    def batch_loss(step):
        numbers = [n % len(mean) for n in range((step - 1) * r["unet_batch"], step * r["unet_batch"])]
        idx = torch.tensor(numbers)
        return small.ldm_loss(unet, mean[idx], logvar[idx], scale, context, numbers, args.seed, step), {}

    small.fit(run, unet, batch_loss, steps=r["unet_steps"], lr=r["unet_lr"], every=r["every"], dist=dist,
              desc="unet")
    small.save_net(unet, done)
    return unet


def stage_base(out, vae, unet, text, vision, scale):
    """base/sd.safetensors (SD single-file names, the latent scale in its metadata) and
    base/clip_vision.safetensors (Hugging Face names): what every tool's --sd / --clip reads."""
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    small.save_sd_file(text, unet, vae, scale, base / "sd.safetensors")
    small.save_vision_file(vision, base / "clip_vision.safetensors")
    return base / "sd.safetensors", base / "clip_vision.safetensors"


def figures(out, data, vae, unet, text, scale, r):
    """What the README shows of the base: vae/reconstructions.png (held-out photos: clean | VAE) with the
    held-out PSNR in vae/heldout.json, and unet/samples.png (unconditional samples, DDIM 50 steps)."""
    from minidiff.diffusion.pipeline import txt2img
    from minidiff.models.stable_diffusion import StableDiffusion
    from minidiff.models.tokenizer import CLIPTokenizer
    recon_png, samples_png = out / "vae" / "reconstructions.png", out / "unet" / "samples.png"
    heldout = heldout_photos(data)
    if heldout and not recon_png.exists():
        clean = [small.to_tensor_square(p, r["size"]) for p in small.load_photos(heldout, r["size"])]
        x = torch.stack(clean)  # [N, 3, size, size]
        with torch.no_grad():
            recon = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
        db = small.psnr(recon, x)
        save_json_atomic({"photos": len(heldout), "psnr_mean_db": round(float(db.mean()), 3),
                          "psnr_db": [round(float(v), 3) for v in db]}, out / "vae" / "heldout.json")
        print(f"vae: held-out reconstruction PSNR {float(db.mean()):.2f} dB over {len(heldout)} photos",
              flush=True)
        sheet = small.pairs_sheet([(small.to_uint8(a), small.to_uint8(b)) for a, b in zip(x[:8], recon[:8])])
        atomic_write(recon_png, lambda tmp: sheet.save(tmp, format="PNG"))
    if not samples_png.exists():
        vae.cfg = replace(vae.cfg, latent_scale=scale)
        sd = StableDiffusion(CLIPTokenizer(), text, unet.eval(), vae)
        images = [txt2img(sd, "", steps=50, guidance=1.0, seed=k, height=r["size"], width=r["size"],
                          progress=False) for k in range(8)]
        sheet = small.pairs_sheet(list(zip(images[:4], images[4:])))
        atomic_write(samples_png, lambda tmp: sheet.save(tmp, format="PNG"))


def heldout_photos(data):
    """The held-out split of a tools/small_data.py folder (never trained on), or [] for a plain folder."""
    if not (Path(data) / "manifest.json").is_file():
        return []
    from minidiff.train.small_data import photo_paths
    return [str(p) for p in photo_paths(Path(data), "heldout")]


def plugin_argv(task, out, photos_dir, sd_path, clip_path, r, args):
    """tools/train.py's command line for one task's plugin on the small base (--resume once it exists)."""
    run_dir = out / "plugins" / task
    argv = ["--task", task, "--data", str(photos_dir), "--degrade", task, "--output", str(run_dir),
            "--sd", str(sd_path), "--clip", str(clip_path), "--resolution", str(r["size"]),
            "--steps", str(r["plugin_steps"]), "--batch-size", str(r["plugin_batch"]),
            "--lr", str(r["plugin_lr"]), "--seed", str(args.seed), "--augment",
            "--checkpoint-every", str(max(1, r["plugin_steps"] // 4)), "--keep-checkpoints", "2",
            "--validate-every", str(r["plugin_steps"]), "--val-pairs", str(r["val_pairs"]), "--num-workers", "0"]
    return argv + (["--resume"] if run_dir.exists() else [])


def stage_plugins(out, photos_dir, sd_path, clip_path, r, args):
    """One Task-Plugin per task through tools/train.py, --jobs at a time (in this process when 1, else as
    subprocesses of one torch thread each); copies each into base/plugins/<task>.safetensors."""
    plugins = out / "base" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    todo = [t for t in r["tasks"] if not (plugins / f"{t}.safetensors").exists()]
    if args.jobs == 1:
        for task in todo:
            code = train_tool.main(plugin_argv(task, out, photos_dir, sd_path, clip_path, r, args))
            if code:
                sys.exit(code)
            shutil.copyfile(out / "plugins" / task / f"{task}.safetensors", plugins / f"{task}.safetensors")
        return plugins
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running, pending = {}, list(todo)
    while pending or running:
        while pending and len(running) < args.jobs:
            task = pending.pop(0)
            cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"),
                   *plugin_argv(task, out, photos_dir, sd_path, clip_path, r, args)]
            log = open(out / f"plugin-{task}.log", "a")
            running[task] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
            print(f"plugins: training {task} (log: {out / f'plugin-{task}.log'})", flush=True)
        time.sleep(2)
        for task, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[task]
            if proc.returncode:
                raise UsageError(f"plugin {task}: tools/train.py exited {proc.returncode} "
                                 f"(see {out / f'plugin-{task}.log'}); --resume continues")
            shutil.copyfile(out / "plugins" / task / f"{task}.safetensors", plugins / f"{task}.safetensors")
    return plugins


def selector_images(out, photo_paths, r, args, name="selector_images"):
    """<out>/<name>/<task>/: degraded copies of the first photos (the selector's pseudo-labels; for
    name="selector_heldout", the held-out photos its evaluation pairs with the held-out instructions)."""
    root = out / name
    for task in r["tasks"]:
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        for k, path in enumerate(photo_paths[:r["selector_photos"]]):
            dest = folder / f"{k:03d}.png"
            if not dest.exists():
                image = small.load_photos([path], r["size"])[0]
                image = image.resize((r["size"], r["size"]))
                degraded = degrade(task, image, (args.seed, k))
                atomic_write(dest, lambda tmp: degraded.save(tmp, format="PNG"))
    return root


def stage_selector(out, photo_paths, sd_path, clip_path, plugins, r, args):
    """The Plugin-Selector through tools/train_selector.py; selector/selector.safetensors. Then, when --data
    has a held-out split, tools/eval_selector.py on its degraded photos and the corpus' held-out
    instructions: selector/heldout.json (Table 5's three settings)."""
    images = selector_images(out, photo_paths, r, args)
    run_dir = out / "selector"
    if not (run_dir / "selector.safetensors").exists():
        train_selector(out, run_dir, images, sd_path, clip_path, plugins, r, args)
    heldout = heldout_photos(args.data)
    if heldout and not (run_dir / "heldout.json").exists():
        argv = ["--selector", str(run_dir / "selector.safetensors"), "--sd", str(sd_path),
                "--clip", str(clip_path), "--plugins", str(plugins), "--cache", str(out / "selector-cache"),
                "--json", str(run_dir / "heldout.json"),
                "--images", str(selector_images(out, heldout, r, args, "selector_heldout"))]
        code = eval_selector_tool.main(argv)
        if code:
            sys.exit(code)
    return run_dir / "selector.safetensors"


def train_selector(out, run_dir, images, sd_path, clip_path, plugins, r, args):
    """tools/train_selector.py with the recipe's settings (--resume when the run folder exists)."""
    argv = ["--output", str(run_dir), "--images", str(images), "--plugins", str(plugins),
            "--sd", str(sd_path), "--clip", str(clip_path), "--steps", str(r["selector_steps"]),
            "--lr", str(r["selector_lr"]), "--loss", r["selector_loss"], "--seed", str(args.seed),
            "--cache", str(out / "selector-cache"),
            "--checkpoint-every", str(max(1, r["selector_steps"] // 3)), "--keep-checkpoints", "2"]
    if run_dir.exists():
        argv.append("--resume")
    code = selector_tool.main(argv)
    if code:
        sys.exit(code)


def ship(dest, sd_path, clip_path, plugins, selector_path, recipe_name, working_size):
    """The family in fp16 into `dest` (sd, clip_vision, plugins/, selector) with manifest.json: the sha256
    and size of every file, checked at load time (minidiff.plugin.small_family)."""
    dest = Path(dest)
    (dest / "plugins").mkdir(parents=True, exist_ok=True)
    small.copy_half(sd_path, dest / "sd.safetensors")
    small.copy_half(clip_path, dest / "clip_vision.safetensors")
    for path in sorted(Path(plugins).glob("*.safetensors")):
        plugin = load_plugin(str(path), dtype=torch.float16)
        save_plugin(plugin, dest / "plugins" / path.name, {**plugin.metadata, "base_model": "minidiff-small"})
    selector = load_selector(str(selector_path), dtype=torch.float16)
    save_selector(selector, dest / "selector.safetensors", {"base_model": "minidiff-small"})
    files = sorted(p for p in dest.rglob("*.safetensors"))
    manifest = {"family": "minidiff-small", "recipe": recipe_name, "working_size": working_size,
                "files": {str(p.relative_to(dest)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in files}}
    save_json_atomic(manifest, dest / "manifest.json")
    total = sum(v["bytes"] for v in manifest["files"].values())
    print(f"shipped {len(files)} files, {total / 2**20:.1f} MiB -> {dest}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "quick" if args.quick else "full"
    r = RECIPES[name]
    out = Path(args.output)
    check_outputs(args, out)
    paths = training_photos(args.data)
    photos = open_photos(paths, r["size"])
    photo_dir = os.path.dirname(paths[0])
    out.mkdir(parents=True, exist_ok=True)
    if args.start_from:
        start_from(out, args.start_from)
    before = json.loads((out / "recipe.json").read_text()) if (out / "recipe.json").exists() else {}
    save_json_atomic({"recipe": name, "data": args.data, "photos": len(paths), "seed": args.seed,
                      "start_from": args.start_from or before.get("start_from"),  # kept across --resume
                      **{k: list(v) if isinstance(v, tuple) else v for k, v in r.items()}}, out / "recipe.json")
    print(f"small family: {len(paths)} training photos from {args.data}, recipe {name} -> {out}", flush=True)
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    last = STAGES.index(args.until)

    def timed(stage, fn, *a):  # seconds spent per stage, summed over the sessions that ran it
        t0 = time.time()
        result = fn(*a)
        times[stage] = round(times.get(stage, 0.0) + time.time() - t0, 1)
        save_json_atomic(times, times_path)
        return result

    def reached(stage):
        return last >= STAGES.index(stage)

    text, vision = small.random_towers()
    vae = timed("vae", stage_vae, out, photos, r, args)
    latents = timed("latents", stage_latents, out, vae, photos, r, args) if reached("latents") else None
    vae = timed("decoder", stage_decoder, out, vae, photos, r, args) if reached("decoder") else vae
    text = timed("text", stage_text, out, text, r, args) if reached("text") else text
    text = timed("words", stage_words, out, text, r, args) if reached("words") else text
    unet = timed("unet", stage_unet, out, latents, small.null_context(text), r, args) if reached("unet") else None
    if not reached("base"):
        return 0
    sd_path, clip_path = stage_base(out, vae, unet, text, vision, latents[2])
    timed("figures", figures, out, args.data, vae, unet, text, latents[2], r)
    if not reached("plugins"):
        return 0
    plugins = timed("plugins", stage_plugins, out, photo_dir, sd_path, clip_path, r, args)
    if not reached("selector"):
        return 0
    selector = timed("selector", stage_selector, out, paths, sd_path, clip_path, plugins, r, args)
    if args.ship:
        ship(args.ship, sd_path, clip_path, plugins, selector, name, r["size"])
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
