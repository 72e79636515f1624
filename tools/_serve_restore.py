"""What one restoration job of tools/serve.py does: check the page's request, plan it, run it with progress
and cancel, and write tools/sample.py's outputs and JSON record. A helper module of tools/serve.py.

The plan the page shows before Run is tools/sample.py's dry run itself (_restore_cli.run_photo with
dry_run=True: minidiff.plugin.restoration.restore_photo's selection, composite table and size rule, then the CLI's
record). A job then runs that plan's plugins here, one UniPC step at a time through minidiff.plugin.plugin.run_plugin
(restore() takes no progress bar to report to or stop at), and writes what run_photo writes for a photo:
<stem>.png, <stem>-compare.png and <stem>.json, the same record with dry_run false, the outputs and the
restore time. The flow is the official demo's (yuhaoliu7456/Diff-Plugin @ 79e12bb, demo.py l.112-251).
"""
import os
import time

from PIL import Image

from _cli import SEED_MAX
from _restore_cli import outputs, run_photo, stem_of
from minidiff.plugin.fake import FAKE_WARNING
from minidiff.io.files import save_json_atomic
from minidiff.io.imageio import (OFFICIAL_SHORT_SIDE, SHORT_SIDES, check_min_side, photo_size, resize_photo,
                              save_png_atomic, side_by_side, to_multiple_of_8)
from minidiff.plugin.plugin import check_fits, clip_features, run_plugin

# demo.py's `image_resolution` slider (short side): min, max, step, default
RESOLUTION = (SHORT_SIDES[0], SHORT_SIDES[-1], SHORT_SIDES[1] - SHORT_SIDES[0], OFFICIAL_SHORT_SIDE)
STEPS = (1, 100, 20)  # demo.py `inference_step` slider: min, max, default
RANDOM_SEED_MAX = 2**31 - 1  # demo.py `seed` slider maximum: random seeds are drawn up to it
MAX_PROMPT_CHARS = 1000


class ParamError(ValueError):
    """A bad request parameter (the server answers 400 with this message)."""


def _int(body, key, lo, hi, default, step=1):
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi or (v - lo) % step:
        every = f" in steps of {step}" if step > 1 else ""
        raise ParamError(f"{key} must be a whole number from {lo} to {hi}{every}, got {v!r}")
    return v


class Restorer:
    """Plans and runs restoration jobs on one set of models (minidiff.plugin.restoration.Models)."""

    def __init__(self, models, settings, record):
        """settings: max_side, chain_steps, threshold, device, dtype (the server's flags), model_side (the
        small family's working size, else None: the resolution slider rules); record():
        the fields tools/sample.py adds to every record (version, device, base model, checkpoint hashes),
        given dry_run (a dry run's record has no hashes, as the CLI's)."""
        self.models, self.settings, self.record = models, dict(settings), record
        self.tasks = list(models.plugins)

    def shown_settings(self):
        """What the page shows read-only."""
        s = self.settings
        return {"device": s["device"], "dtype": s["dtype"], "chain_steps": s["chain_steps"],
                "max_side": s["max_side"], "threshold": s["threshold"], "fake_weights": self.models.fake,
                "size_rule": "official demo (demo.py): short side = resolution, bicubic, then multiples of 8"
                             + (f"; long side at most {s['max_side']}" if s["max_side"] else ""),
                **({"warning": FAKE_WARNING} if self.models.fake else {})}

    def check_params(self, body):
        """The job parameters of a request body, checked; ParamError names the first bad one. seed: None
        (or the official slider's -1) for a random one."""
        known = {"upload", "prompt", "tasks", "resolution", "steps", "seed"}
        unknown = sorted(map(str, set(body) - known))
        if unknown:
            raise ParamError(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if not isinstance(body.get("upload"), str):
            raise ParamError("upload: the id /api/upload returned is missing")
        prompt, tasks = body.get("prompt"), body.get("tasks")
        if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
            raise ParamError(f"prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        prompt = prompt if prompt and prompt.strip() else None
        if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks)):
            raise ParamError("tasks must be a list of task names")
        unknown = [t for t in tasks or [] if t not in self.tasks]
        if unknown:
            raise ParamError(f"unknown task {unknown[0]!r}; known: {', '.join(self.tasks)}")
        if tasks and len(set(tasks)) < len(tasks):
            raise ParamError("a task is repeated")
        if prompt and tasks:
            raise ParamError("give a prompt (the selector chooses) or tasks (you choose), not both")
        if not prompt and not tasks:
            raise ParamError("say what to do: type an instruction, press a preset or pick tasks")
        lo, hi, step, default = RESOLUTION
        seed = body.get("seed")
        return {"upload": body["upload"], "prompt": prompt, "tasks": tasks or None,
                "resolution": _int(body, "resolution", lo, hi, default, step),
                "steps": _int(body, "steps", STEPS[0], STEPS[1], STEPS[2]),
                "seed": None if seed in (None, -1) else _int(body, "seed", 0, SEED_MAX, None)}

    def check_size(self, image, params):
        """ImageError when the size rule would leave a side under the smallest size (arithmetic only)."""
        check_min_side(photo_size(*image.size, "demo", self.short_side(params), self.settings["max_side"])[0])

    def short_side(self, params):
        """The page's resolution slider, or the small family's working size (it was trained at that size)."""
        return self.settings.get("model_side") or params["resolution"]

    def _kw(self, params, seed):
        """restore_photo's arguments for a request: the page is the official demo, so its size rule (short
        side = the resolution slider) whether the selector picks the plugins or the user does."""
        s = self.settings
        return dict(prompt=params["prompt"], tasks=params["tasks"], resize="demo",
                    short_side=self.short_side(params), max_side=s["max_side"], steps=params["steps"],
                    chain_steps=s["chain_steps"], seed=seed, threshold=s["threshold"])

    def plan(self, entry, params, folder):
        """tools/sample.py --dry-run on the upload (its JSON is written to `folder`): the record, plus
        `plan` in words ("derain then dehaze")."""
        extra = {**self.record(dry_run=True), "input": entry["name"]}  # the client's name, not our path
        record = run_photo(self.models, entry["path"], folder, dry_run=True, progress=False, record=extra,
                           **self._kw(params, None))
        return {**record, "plan": " then ".join(record["tasks"]) or "no plugin applies: the photo comes back "
                                                                     "at the processed size, as demo.py"}

    def run(self, job, folder):
        """Run job.params (check_params' plus image, entry and its plan) into `folder`; returns the record."""
        p, m, s = job.params, self.models, self.settings
        job.stage = "selecting" if p["prompt"] else "preparing"
        plan = p["plan"] or self.plan(p["entry"], p, folder)
        record = {k: v for k, v in plan.items() if k != "plan"}
        record.update(seed=p["seed"], dry_run=False, **self.record(dry_run=False))
        t0 = time.perf_counter()
        image = p["image"]
        # as planned: the short side the plan used (the small family's working size, else the slider)
        resized, _ = resize_photo(image, record["resize_rule"], self.short_side(p), s["max_side"])
        plugins = [m.plugins[t] for t in record["tasks"]]
        steps = [p["steps"]] + [record["chain_steps_used"]] * (len(plugins) - 1)
        bar = job.bar(sum(steps) if plugins else 0, record["tasks"])
        result = resized  # no plugin applies: the resized photo, as demo.py l.185-187 (and restore_photo)
        if plugins:
            for plugin in plugins:
                check_fits(m.sd, m.clip_vision, plugin)
            feats = clip_features(m.clip_vision, image)  # CLIP reads the photo as loaded (demo.py l.123)
            result = to_multiple_of_8(resized)
            for plugin, n in zip(plugins, steps):  # each on the previous output, seeded alike (restore())
                job.start_plugin(plugin.task)  # its start time: the estimate of time left counts the encode
                result = run_plugin(m.sd, plugin, feats, result, n, p["seed"], bar)
        job.check()  # cancelled during the last step or the decode: nothing is written
        job.stage = "saving"
        names = outputs(stem_of(p["entry"]["path"]))
        save_png_atomic(result, os.path.join(folder, names["result"]))
        save_png_atomic(side_by_side(image, result), os.path.join(folder, names["compare"]))
        before = resized if resized.size == result.size else resized.resize(result.size, Image.BICUBIC)
        save_png_atomic(before, os.path.join(folder, "input.png"))  # the page's before/after, not the CLI's
        record["outputs"] = {"result": names["result"], "compare": names["compare"]}
        record["timings_s"] = {**record["timings_s"], "restore": round(time.perf_counter() - t0, 3)}
        save_json_atomic(record, os.path.join(folder, names["record"]))  # last, as run_photo
        return record
