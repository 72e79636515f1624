"""tools/sample.py's side of restoration: which photos and instructions, which weight files, and the outputs
(<stem>.png, <stem>-compare.png, <stem>.json) with the record of what was done. The restoration itself is
minidiff.plugin.restoration.restore_photo; this helper module of the scripts beside it is not a script.
"""
import json
import os

from _cli import UsageError, checkpoints_root, default_weights
from minidiff.download import base_model_id, default_checkpoint_paths, loader_files_missing
from minidiff.plugin.fake import FAKE_WARNING, fake_models, with_files
from minidiff.io.files import remove_stale_temps, save_json_atomic
from minidiff.io.imageio import (IMAGE_SUFFIXES, OFFICIAL_SHORT_SIDE, list_images, load_image, save_png_atomic,
                                 side_by_side)
from minidiff.plugin.files import find_plugins
from minidiff.plugin.plugin import TASKS
from minidiff.plugin.restoration import restore_photo


def outputs(stem):
    """The files one photo gives, in the order they are written: the JSON record last (a photo is done when
    its JSON exists)."""
    return {"result": stem + ".png", "compare": stem + "-compare.png", "record": stem + ".json"}


def stem_of(path):
    return os.path.splitext(os.path.basename(path))[0]


def plan_inputs(src, out_dir, prompt=None, tasks=None, prompts_file=None):
    """Photos of `src` (a file or a folder's images) and {photo: instruction, or None with explicit tasks}.

    Without prompt and tasks, each photo's instruction comes from `prompts_file` (JSON {stem: instruction}),
    by default prompts.json in the input folder. Refuses (UsageError) an output folder that is the input
    folder, two photos with the same stem, and missing or blank instructions.
    """
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or folder")
    if os.fspath(out_dir).lower().endswith(IMAGE_SUFFIXES) and not os.path.isdir(out_dir):
        raise UsageError(f"output {out_dir}: give a folder; each photo's outputs are named after it")
    photos = list_images(src) if os.path.isdir(src) else [src]
    if not photos:
        raise UsageError(f"{src}: no image files (.png, .jpg, ...) in this folder")
    stems = [stem_of(p) for p in photos]
    if len(set(stems)) < len(stems):
        raise UsageError(f"{src}: two photos share a name ({stems}); their outputs would collide")
    in_dir = src if os.path.isdir(src) else (os.path.dirname(src) or ".")
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, in_dir):
        raise UsageError(f"output folder {out_dir} is the input folder: choose another (inputs stay intact)")
    if prompt is not None or tasks:
        if prompts_file:
            raise UsageError("a prompts file gives each photo its instruction: drop --prompt and --task")
        return photos, {p: prompt for p in photos}
    if prompts_file and not os.path.isfile(prompts_file):
        raise UsageError(f"--prompts {prompts_file}: no such file")
    table = prompts_file or os.path.join(in_dir, "prompts.json")
    if not os.path.isfile(table):
        raise UsageError("say what to do: --prompt \"remove the rain\" (selector) or --task derain")
    try:
        with open(table, encoding="utf-8") as f:
            by_stem = json.load(f)
        prompts = {p: by_stem[s] for p, s in zip(photos, stems)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{table}: not a JSON object with an instruction per photo ({e!r})") from None
    if any(not isinstance(v, str) or not v.strip() for v in prompts.values()):
        raise UsageError(f"{table}: an instruction is empty or not a string")
    return photos, prompts


def fill_weight_paths(args, repo):
    """--model and the weight files (_cli.default_weights): --sd/--clip/--plugins/--selector default to the
    published checkpoints/ layout (the base is SD-1.4, as the official scripts: infer.py l.22, demo.py l.19)
    or to the small family. Sets args.model ("published", "small" or "fake") and args.model_side."""
    published = {"sd": "sd14", "clip": "clip", "plugins": "plugins", "selector": "selector"}
    if args.fake_weights:  # no family to choose; the paths stay those of checkpoints/ (plan lists its plugins)
        args.model, args.model_side = "fake", OFFICIAL_SHORT_SIDE
        paths = default_checkpoint_paths(checkpoints_root(repo))
        for flag, key in published.items():
            setattr(args, flag, getattr(args, flag) or paths[key])
        return
    default_weights(args, repo, published)


def given_weights(args):
    """Remember the --plugins/--selector typed on the command line (args.given_plugins, args.given_selector:
    fill_weight_paths later fills in defaults); with --fake-weights, a typed path that does not exist is
    refused here (UsageError), as those files are then loaded over the random base (load_fake)."""
    args.given_plugins, args.given_selector = args.plugins, args.selector
    if not args.fake_weights:
        return  # the real loaders list every missing file at once (missing_weights)
    if args.plugins and not os.path.isdir(args.plugins):
        raise UsageError(f"--plugins {args.plugins}: no such folder (the folder holding <task>.safetensors)")
    if args.selector and not os.path.isfile(args.selector):
        raise UsageError(f"--selector {args.selector}: no such file")


def load_fake(args, tasks, need_selector, dtype, device):
    """--fake-weights: (models, {name: file}) of random tiny models, with the plugins of a typed --plugins
    folder (the tasks asked for, else all it holds) and a typed --selector file loaded over them, so that
    what tools/train.py --fake-weights trained can be tried; without those, random plugins for the tasks."""
    plugins = {}
    if args.given_plugins:
        found = find_plugins(args.given_plugins)
        missing = [t for t in tasks or [] if t not in found]
        if missing or not found:
            raise UsageError(f"--plugins {args.given_plugins}: no plugin file for "
                             f"{', '.join(missing) or 'any task'} (found: {', '.join(found) or 'none'})")
        plugins = {t: found[t] for t in tasks or found}
    selector = args.given_selector
    models = fake_models([] if plugins else tasks or TASKS, need_selector and not selector, device, dtype)
    models = with_files(models, plugins, selector, dtype=dtype, device=device)
    files = {**{f"plugin:{t}": p for t, p in plugins.items()}, **({"selector": selector} if selector else {})}
    return models, files


def missing_weights(args, tasks, need_selector):
    """Files the loaders would need and do not find (files, not folders: an interrupted download leaves
    folders behind); only the plugins asked for when tasks are explicit."""
    wanted = [("sd", args.sd), ("clip", args.clip)] + ([("selector", args.selector)] if need_selector else [])
    missing = [p for kind, p in wanted for p in loader_files_missing(kind, p)]
    found = find_plugins(args.plugins)
    if tasks:
        missing += [os.path.join(args.plugins, t) for t in tasks if t not in found]
    elif need_selector and not found:
        missing.append(args.plugins)
    return missing


def base_model_check(sd_path, plugins, sd_sha256=None):
    """(record, warning or None): which Stable Diffusion runs, which ones the plugins were trained on."""
    base = base_model_id(sd_path, sd_sha256)
    trained = {t: p.metadata.get("base_model", "unknown") for t, p in plugins.items()}
    other = sorted({b for b in trained.values() if base_model_id(b) != base and b != "unknown"})
    record = {"path": os.path.abspath(sd_path), "id": base, "plugins_trained_on": trained}
    if not other:
        return record, None
    names = [t for t, b in trained.items() if b in other]
    return record, (f"plugins {', '.join(names)} were trained on {', '.join(other)}, but the base is {base}: "
                    "results will differ from the official ones (--sd selects the base)")


def clean_start(out_dir, photos, skip_existing):
    """Photos still to do (with skip_existing, a photo whose JSON exists is done), after removing the
    temporaries that a killed run left for these outputs; returns (todo, names of removed temporaries)."""
    names = {n for p in photos for n in outputs(stem_of(p)).values()}
    removed = remove_stale_temps(out_dir, names)
    done = [p for p in photos if os.path.isfile(os.path.join(out_dir, outputs(stem_of(p))["record"]))]
    return [p for p in photos if not (skip_existing and p in done)], removed


def null_note(resize):
    """The resize note when no plugin applies: the result is the photo after the size rule, as demo.py
    (l.185-187) returns it."""
    if resize.endswith("unchanged"):
        return f"{resize}; no plugin applies: the photo comes back untouched"
    return f"{resize}; no plugin applies: the result is the photo at that size, as demo.py returns it"


def demo_short_side(kw):
    """The short side the demo rule used (imageio.photo_size): --short-side, else the model's working size."""
    return kw.get("short_side") or kw.get("model_side") or OFFICIAL_SHORT_SIDE


def run_photo(models, path, out_dir, *, record=None, dry_run=False, progress=True, restored=None, **kw):
    """Restore one photo file with restore_photo(**kw) and write its outputs, each atomically, the JSON
    record last; with dry_run only the JSON. `record`: extra fields (settings, hashes). `restored`: (image
    as loaded, input notes, Restored) already made (tools/_batch.py), only written here. Returns the record."""
    notes = []
    if restored is None:
        image = load_image(path, notes)
        out = restore_photo(models, image, dry_run=dry_run, progress=progress, **kw)
    else:
        image, notes, out = restored
    names = outputs(stem_of(path))
    fake = models is not None and models.fake  # None: a dry run with explicit tasks needs no models
    prompt = kw.get("prompt")
    rec = {"input": os.path.abspath(path), "prompt": prompt, "tasks": out.tasks, "scores": out.scores,
           "composite_matches": out.composite_matches if prompt is not None else None,
           "composite_tasks": out.by_table if prompt is not None else None,
           "threshold": kw.get("threshold", 0.0) if prompt is not None else None, "fake_weights": fake,
           **({"warning": FAKE_WARNING} if fake else {}), "dry_run": dry_run, "outputs": None,
           "input_size": list(image.size), "input_notes": notes, "processed_size": list(out.size),
           "resize": out.resize if out.tasks else null_note(out.resize), "resize_rule": out.rule,
           "short_side": demo_short_side(kw) if out.rule == "demo" else None, "max_side": kw.get("max_side"),
           "seed": kw.get("seed"), "steps": kw.get("steps"), "chain_steps": kw.get("chain_steps"),
           "chain_steps_used": out.chain_steps,
           "warnings": [n for n in notes if n.startswith("animated")] + out.warnings, **(record or {})}
    if not dry_run:
        save_png_atomic(out.image, os.path.join(out_dir, names["result"]))
        save_png_atomic(side_by_side(image, out.image), os.path.join(out_dir, names["compare"]))
        rec["outputs"] = {"result": names["result"], "compare": names["compare"]}
    rec["timings_s"] = out.timings
    save_json_atomic(rec, os.path.join(out_dir, names["record"]))
    return rec
