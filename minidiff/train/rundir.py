"""A training run's folder: config.json (every setting, the data and weight hashes, the checkpoints'
SHA-256), atomic checkpoints (checkpoints/step-NNNNNN/: model.safetensors, trainer.pt, state.json), their
verification on resume, and the NaN/inf stop. Every training tool uses it (tools/train.py,
tools/train_selector.py, minidiff/train/small.py); the processes and their batches are in
minidiff/train/trainer.py, the log and the plot in minidiff/train/runlog.py.

Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, train.py (accelerate `checkpoint-<step>/` folders, resume
from the latest). Kept: one folder per checkpoint step, the latest one resumed. Changed (see
../shared/reference/official-facts.md §7): a checkpoint is written into a temporary folder and renamed, so
a half-written one is never taken as the latest; it holds everything resume needs (weights, optimizer,
the python/numpy/torch RNG states, the data position); and each file's SHA-256 is recorded in config.json,
so a truncated or changed checkpoint is reported and the previous one taken.

    run = rundir.RunDir("runs/x", kind="plugin", task="deblur", resume=True, dist=dist)
    run.check(settings, fixed=("seed", "lr"))   # UsageError before any weight loads
    run.start(settings, data=listing_info)       # config.json (rank 0)
    ckpt = run.resume_checkpoint()               # the latest intact checkpoint, or None
    run.save_checkpoint(step, tensors, optimizer.state_dict(), data_position=step * batch)
"""
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minidiff.errors import NonFiniteError, UsageError
from minidiff.io.files import probe_writable, save_json_atomic, sha256_file

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")  # finished checkpoints; temporaries start with "."
CHECKPOINT_FILES = ("model.safetensors", "trainer.pt", "state.json")  # what save_checkpoint writes


def check_writable(path):
    """UsageError unless `path` is (or can be created as) a folder we can write into. Writes nothing that
    stays: the probe is a temporary file in the nearest existing folder, removed at once."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {path}: exists and is not a folder")
    try:
        probe_writable(path)
    except NotADirectoryError as e:
        raise UsageError(f"--output {path}: cannot be created ({e} is a file)") from None
    except OSError as e:
        raise UsageError(f"--output {path}: not writable ({e.strerror or e})") from None


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    """What load_checkpoint returns: everything a resumed run needs."""
    path: Path
    step: int
    tensors: dict  # the trainable weights, {name: tensor}
    optimizer: dict  # optimizer.state_dict() (and anything else the tool put under trainer.pt's "extra")
    data_position: int  # global samples consumed so far
    state: dict  # state.json: step, data_position, rng (python, numpy), the tool's `info`
    rng_torch: torch.Tensor  # torch CPU RNG state at the save


class RunDir:
    """One training run's folder: config.json, checkpoints/, log.csv, loss.png, the tool's outputs."""

    def __init__(self, path, kind, task, resume, dist):
        self.path, self.kind, self.task, self.resume, self.dist = Path(path), kind, task, resume, dist
        self.config_path = self.path / "config.json"
        self.ckpt_dir = self.path / "checkpoints"
        self.config = None

    def check(self, settings, fixed=()):
        """Validate the folder against this run before anything loads or is written (UsageError).

        settings: every setting of the run (JSON-able). fixed: names that must equal the saved run's on
        --resume (those that change the result: seed, lr, batch, data, ...); the rest may change.
        """
        check_writable(self.path)
        if self.resume and not self.path.is_dir():
            raise UsageError(f"--resume: {self.path} does not exist (start the run without --resume)")
        if not self.config_path.exists():
            if self.resume:
                raise UsageError(f"--resume: {self.path} holds no config.json; not a training run folder")
            return
        try:
            saved = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{self.config_path}: unreadable ({e})") from None
        if (saved.get("kind"), saved.get("task")) != (self.kind, self.task):
            raise UsageError(f"--output {self.path} holds a {saved.get('kind')} run for task "
                             f"{saved.get('task')!r}, not {self.kind} {self.task!r}; choose another --output")
        if not self.resume:
            raise UsageError(f"--output {self.path} already holds a run; add --resume to continue it "
                             "or choose another --output")
        for name in fixed:
            old, new = saved.get("settings", {}).get(name), settings.get(name)
            if old != new:
                raise UsageError(f"--resume: {name} was {old!r} in this run, now {new!r}; "
                                 "resume with the same value or start a new --output")
        self.config = saved

    def start(self, settings, **info):
        """Write config.json (rank 0): kind, task, every setting, the tool's info (data listing hash,
        weight hashes, ...), the hashes of the checkpoints present; remove stale checkpoint temporaries."""
        if not self.dist.is_main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.ckpt_dir.glob(".step-*"):  # a checkpoint whose writer was killed mid-way
            shutil.rmtree(stale, ignore_errors=True)
        history = (self.config or {}).get("history", []) + [{"world_size": self.dist.world_size,
                                                              "resume": bool(self.resume)}]
        self.config = {"kind": self.kind, "task": self.task, "settings": settings, **info,
                       "checkpoints": (self.config or {}).get("checkpoints", {}), "history": history}
        self._sync_checkpoint_hashes()

    def _sync_checkpoint_hashes(self):
        present = {p.name for p in self._finished()}
        ckpts = {k: v for k, v in self.config["checkpoints"].items() if k in present}
        for name in sorted(present - set(ckpts)):
            ckpts[name] = {f.name: sha256_file(f) for f in sorted((self.ckpt_dir / name).iterdir())}
        self.config["checkpoints"] = ckpts
        save_json_atomic(self.config, self.config_path)

    def _finished(self):
        if not self.ckpt_dir.is_dir():
            return []
        found = [p for p in self.ckpt_dir.iterdir()
                 if CHECKPOINT_RE.match(p.name) and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))

    def latest_checkpoint(self):
        """Path of the finished checkpoint with the highest step, or None."""
        found = self._finished()
        return found[-1] if found else None

    def save_checkpoint(self, step, tensors, optimizer, data_position, info=None, keep=0):
        """Write checkpoints/step-NNNNNN/ atomically (rank 0; others return at once):
        model.safetensors (tensors), trainer.pt (optimizer state dict + torch RNG), state.json (step, data
        position, python/numpy RNG, info). Each file is fsynced, then the folder is renamed into place.
        keep > 0: delete all but the newest `keep` checkpoints afterwards."""
        if not self.dist.is_main:
            return None
        final = self.ckpt_dir / f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=self.ckpt_dir))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(tensors, tmp / "model.safetensors")
            torch.save({"optimizer": optimizer, "rng_torch": torch.get_rng_state()}, tmp / "trainer.pt")
            np_state = np.random.get_state()
            state = {"step": step, "data_position": data_position, "info": info or {},
                     "rng_python": random.getstate(),
                     "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
            (tmp / "state.json").write_text(json.dumps(state))  # written last: marks the folder complete
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            if final.exists():  # the same step saved again (a rerun): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.ckpt_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if keep > 0:
            for old in self._finished()[:-keep]:
                shutil.rmtree(old)
        if self.config is not None:  # a step written again replaces the folder: record its new hashes
            self.config["checkpoints"].pop(final.name, None)
        self._sync_checkpoint_hashes()
        return final

    def load_checkpoint(self, path):
        """Read a checkpoint folder (any rank) and restore the python/numpy/torch RNG states. None -> None."""
        if path is None:
            return None
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        extra = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        random.setstate((state["rng_python"][0], tuple(state["rng_python"][1]), state["rng_python"][2]))
        name, keys, *rest = state["rng_numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(extra["rng_torch"])
        return Checkpoint(path, state["step"], load_file(path / "model.safetensors"), extra["optimizer"],
                          state["data_position"], state, extra["rng_torch"])

    def checkpoint_problem(self, path):
        """None if checkpoint folder `path` holds its three files and each matches the SHA-256 that
        config.json recorded for it (when recorded), else one line saying what is wrong with it."""
        recorded = (self.config or {}).get("checkpoints", {}).get(Path(path).name, {})
        for name in CHECKPOINT_FILES:
            f = Path(path) / name
            if not f.is_file():
                return f"{f}: missing"
            if name in recorded and sha256_file(f) != recorded[name]:
                return f"{f}: does not match the SHA-256 recorded in config.json (truncated or changed)"
        return None

    def resume_checkpoint(self, named=None, say=print):
        """Load the checkpoint a resumed run continues from (None: no checkpoint yet, start from step 0).

        named: a checkpoint folder (--resume-from); it must be intact, else UsageError. Otherwise the latest
        intact one: each newer checkpoint that fails its hash check or cannot be read is reported with
        `say` in one line, and the previous one is taken (UsageError when none is left)."""
        candidates = [Path(named)] if named else self._finished()[::-1]
        problems = []
        for path in candidates:
            problem = self.checkpoint_problem(path)
            if problem is None:
                try:
                    return self.load_checkpoint(path)
                except Exception as e:  # a file that passed (or had no recorded hash) but does not parse
                    first = (str(e).splitlines() or [""])[0][:120]
                    problem = f"{path}: unreadable ({type(e).__name__}: {first})"
            if named:
                raise UsageError(f"--resume-from {problem}")
            problems.append(problem)
            if self.dist.is_main:
                say(f"--resume: skipping a bad checkpoint: {problem}; falling back to the previous one",
                    flush=True)
        if problems:
            raise UsageError(f"--resume: no intact checkpoint in {self.ckpt_dir} (newest: {problems[0]})")
        return None


def check_finite(loss, step, run):
    """Raise NonFiniteError if `loss` (a number or 0-d tensor) is NaN or infinite, naming the step."""
    value = float(loss)
    if not np.isfinite(value):
        latest = run.latest_checkpoint()
        keep = f"the latest checkpoint, {latest.name}, is the last good one" if latest else \
            "no checkpoint yet"
        raise NonFiniteError(f"loss is {value} at step {step}: training stopped; {keep}")
