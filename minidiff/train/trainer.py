"""Shared training machinery for minidiff's training tools: the run folder, atomic checkpoints and exact
resume, the CSV log and its loss plot, the progress bar, and data parallelism over torch.distributed.
Used by tools/train.py (Task-Plugins) and tools/train_selector.py (the Plugin-Selector).

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024).
Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, train.py (accelerate `checkpoint-<step>/` folders, resume
from the latest, tracker logs). Kept: one folder per checkpoint step, the latest one resumed. Changed (see
../shared/reference/official-facts.md §7): a checkpoint is written into a temporary folder and renamed, so
a half-written one is never taken as the latest, and it holds everything resume needs; draws come from
generators seeded by (seed, step, sample), not from a global RNG, so a resumed run, or one resumed with
another number of processes, sees the same batches, noises and timesteps as an uninterrupted one.

A training tool uses it like this (every rank runs the same code; rank 0 alone writes):

    dist = trainer.setup_distributed("auto", global_batch=64, grad_accum=1)  # torchrun env -> gloo / nccl
    run = trainer.RunDir("runs/x", kind="plugin", task="deblur", resume=True, dist=dist)
    run.check(settings, fixed=("seed", "lr", ...))  # bad input -> UsageError, before any weight loads
    ...build the models, the optimizer...
    run.start(settings, data=listing_info, weights=weight_hashes)  # config.json (rank 0)
    ckpt = run.load_checkpoint(run.latest_checkpoint())           # None: a fresh run from step 0
    start = 0 if ckpt is None else ckpt.step                      # restore tensors/optimizer from ckpt
    log = trainer.CsvLog(run.path / "log.csv", ["step", "loss"], start, dist)
    model = trainer.wrap_ddp(module, dist)
    for step in range(start + 1, steps + 1):                       # `step` = number of updates done after it
        loss = trainer.all_reduce_mean(loss, dist)                # global-batch mean, same on every rank
        trainer.check_finite(loss, step, run)                     # NaN/inf -> NonFiniteError naming the step
        log.write({"step": step, "loss": loss.item()})
        if step % every == 0:
            run.save_checkpoint(step, tensors, optimizer.state_dict(), data_position=step * batch)
    trainer.plot_loss(run.path / "log.csv", run.path / "loss.png")
    trainer.cleanup_distributed(dist)

Sample bookkeeping: the global batch of update `step` holds the global sample numbers
n = (step - 1) * B ... step * B - 1; `seeding.sample_item(seed, n_items, n)` maps n to (dataset item, epoch)
through a seeded permutation per epoch; `rank_micro_batches` gives each rank its slice, split for
gradient accumulation; `StepBatches` feeds a DataLoader.
"""
import csv
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
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file

from minidiff.errors import NonFiniteError, UsageError  # noqa: F401 (the tools imported them from here)
from minidiff.io.files import probe_writable, save_json_atomic, sha256_file

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")  # finished checkpoints; temporaries start with "."
CHECKPOINT_FILES = ("model.safetensors", "trainer.pt", "state.json")  # what save_checkpoint writes


# ---------------------------------------------------------------------------------------------------------
# Sample bookkeeping over processes (the seeded draws themselves are in minidiff/train/seeding.py)
# ---------------------------------------------------------------------------------------------------------

def rank_micro_batches(step, global_batch, grad_accum, dist):
    """Global sample numbers this rank handles in update `step` (1-based), as `grad_accum` micro-batches.

    The global batch is cut into world_size contiguous slices, one per rank, each cut into grad_accum
    micro-batches: the union over ranks is the same global batch whatever the number of processes.
    """
    per_rank = global_batch // dist.world_size
    micro = per_rank // grad_accum
    first = (step - 1) * global_batch + dist.rank * per_rank
    return [list(range(first + k * micro, first + (k + 1) * micro)) for k in range(grad_accum)]


class StepBatches:
    """A DataLoader batch_sampler: this rank's micro-batches of global sample numbers, update after update,
    for updates start+1 .. steps (rank_micro_batches of each)."""

    def __init__(self, start, steps, global_batch, grad_accum, dist):
        self.start, self.steps, self.global_batch, self.grad_accum, self.dist = \
            start, steps, global_batch, grad_accum, dist

    def __iter__(self):
        for step in range(self.start + 1, self.steps + 1):
            yield from rank_micro_batches(step, self.global_batch, self.grad_accum, self.dist)

    def __len__(self):
        return (self.steps - self.start) * self.grad_accum


# ---------------------------------------------------------------------------------------------------------
# Data parallelism (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto", global_batch=None, grad_accum=1, join=True):
    """Read torchrun's environment and join the process group (gloo on CPU, nccl on CUDA).

    The batch arithmetic is checked first (a wrong --batch-size fails at once, not after a hang).
    device: "auto" (CUDA when present), "cpu", "cuda". Each rank takes cuda:LOCAL_RANK. join=False: only
    read and check; call join_process_group(dist) once the tool's own input checks have passed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if global_batch is not None and global_batch % (world * grad_accum):
        raise UsageError(f"--batch-size {global_batch} does not divide over {world} process(es) x "
                         f"--grad-accum {grad_accum}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    dist = Dist(rank, world, local, dev)
    if join:
        join_process_group(dist)
    return dist


def backend_options(device):
    """Everything of the DDP path that depends on the device, in one place: (process-group backend, keyword
    arguments of DistributedDataParallel). CUDA: NCCL, and the rank's own GPU as device_ids/output_device;
    CPU: gloo and none. The rest is one code path, so the gloo tests on the CPU run the code NCCL runs."""
    if device.type == "cuda":
        return "nccl", {"device_ids": [device.index], "output_device": device.index}
    return "gloo", {}


def join_process_group(dist):
    if dist.device.type == "cuda":
        torch.cuda.set_device(dist.device)
    if dist.world_size > 1 and not torch_dist.is_initialized():
        backend, _ = backend_options(dist.device)
        torch_dist.init_process_group(backend, rank=dist.rank, world_size=dist.world_size)


def cleanup_distributed(dist):
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist):
    if dist.world_size > 1:
        torch_dist.barrier()


def check_on_main(dist, check):
    """Run `check()` on rank 0 only (e.g. decoding every image once), share its UsageError with every rank,
    and raise it everywhere, so all processes stop together with the same one-line message."""
    message = [None]
    if dist.is_main:
        try:
            check()
        except UsageError as e:
            message[0] = str(e)
    if dist.world_size > 1:
        torch_dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UsageError(message[0])


def all_reduce_mean(value, dist):
    """Mean over ranks of a tensor (each rank's mean over its equal share = the global-batch mean)."""
    if dist.world_size == 1:
        return value
    value = value.detach().clone()
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value / dist.world_size


def wrap_ddp(module, dist):
    """DistributedDataParallel around `module` when running under torchrun, else the module itself.

    DDP averages the gradients of the trainable parameters over ranks during backward; use its no_sync()
    for the gradient-accumulation micro-batches before the last one.
    """
    if dist.world_size == 1:
        return module
    _, options = backend_options(dist.device)
    return torch.nn.parallel.DistributedDataParallel(module, **options)


# ---------------------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Logging: log.csv (flushed per row), loss.png (Pillow), the progress bar
# ---------------------------------------------------------------------------------------------------------

class CsvLog:
    """log.csv with a fixed header. On resume from `start_step`, rows after that step are dropped (they
    belong to the lost part of the interrupted run), so the log matches the weights. Rank 0 writes."""

    def __init__(self, path, fields, start_step, dist):
        self.path, self.fields, self.file = Path(path), list(fields), None
        if not dist.is_main:
            return
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")

    def write(self, row):
        if self.file is None:
            return
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def read_log(path, column="loss"):
    """[(step, value)] for the rows of log.csv where `column` is set."""
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def plot_loss(log_path, png_path, smooth=0.95, size=(800, 400)):
    """Draw the loss of log.csv (thin, grey) and its exponential moving average (bold, blue) with Pillow."""
    from PIL import Image, ImageDraw, ImageFont
    from minidiff.io.imageio import save_png_atomic
    points = read_log(log_path)
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), f"loss (grey) and its moving average (blue, {smooth})", fill="black", font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    if points:
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        avg, ema = [], 0.0
        for k, v in enumerate(values, start=1):
            ema = smooth * ema + (1 - smooth) * v
            avg.append(ema / (1 - smooth ** k))  # bias-corrected, as Adam's moments: no pull towards 0
        lo, hi = min(values), max(values)
        hi = lo + 1e-12 if hi <= lo else hi
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(s, v):
            x = left + (s - s0) / (s1 - s0) * (w - left - right)
            return x, top + (hi - v) / (hi - lo) * (h - top - bottom)
        for k in range(5):  # y ticks, bottom to top; x ticks at the two ends
            v = lo + k / 4 * (hi - lo)
            draw.text((4, xy(s0, v)[1] - 6), f"{v:.4g}", fill="black", font=font)
        draw.text((left, h - bottom + 6), str(s0), fill="black", font=font)
        draw.text((w - right - 40, h - bottom + 6), str(steps[-1]), fill="black", font=font)
        draw.text(((w - 30) // 2, h - bottom + 22), "step", fill="black", font=font)
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, values)], fill=(170, 170, 170), width=1)
            draw.line([xy(s, v) for s, v in zip(steps, avg)], fill=(30, 80, 200), width=3)
    save_png_atomic(img, png_path)


def progress(total, initial, dist, desc="train"):
    """tqdm bar over update steps on rank 0 (disabled elsewhere); set its postfix to loss and images/s."""
    from tqdm import tqdm
    quiet = {} if dist.is_main else {"disable": True}  # rank 0 leaves it to tqdm (TQDM_DISABLE=1 works)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, **quiet)
