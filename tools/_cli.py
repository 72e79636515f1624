"""What minidiff's tools share: one parser, one table of exit statuses, argument types, the up-front output check,
the dtype table.

Every tool in tools/ (and tools/bench/) speaks the same way. A command line that does not parse (an unknown
flag, a value of the wrong type or out of range, e.g. `--lr -1e-5` or `--threshold nan`) prints ONE line
"<tool>: error: ... (see <tool> --help)" and exits 2. Anything else that stops a tool prints one line
"error: ..." (or "interrupted: ..." / "terminated: ...") and exits with the status of EXIT_STATUS below;
nothing half-written is left behind (outputs are written to a temporary name and renamed):
    0    done
    1    failed: missing or unreadable weights, a failed download, an I/O error, out of memory
    2    usage or data: a refused request (UsageError), an unusable image or data set (ImageError,
         MetricsError), and a command line that does not parse
    3    a non-finite result: NaN/inf latents or loss (NonFiniteError); training keeps its last good checkpoint
    130  interrupted by Ctrl-C;  143  stopped by SIGTERM
The classes are minidiff/errors.py's. An exception of no class below is a bug and keeps its traceback.
This module is a helper of the scripts beside it (not a script).
"""
import argparse
import errno
import math
import os
import re
import signal
import sys

import torch

from minidiff.errors import (CheckpointError, DownloadError, ImageError, MetricsError, MissingPlugins,
                             NonFiniteError, PluginMismatchError, UsageError)
from minidiff.io.cpu import native_bf16
from minidiff.io.files import probe_writable

# Seeds: what torch.Generator.manual_seed takes as a non-negative 64-bit signed integer on every torch
# version (the official code seeds a CPU torch.Generator; negative seeds would alias large ones).
SEED_MAX = 2**63 - 1


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `finally` blocks and atomic writes clean up."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default once, and none for flags whose default is "not given" (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


# What argparse takes for a negative number (a value, not a flag): its own pattern misses "-1e-5" and "-inf".
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class OneLineParser(argparse.ArgumentParser):
    """The parser of every tool: a command line that does not parse gives ONE line on stderr,
    "<tool>: error: ... (see <tool> --help)", and exit status 2; negative numbers parse as values (then range
    checks refuse them in one line); --help shows each default once, none for "not given"."""

    def __init__(self, doc="", **kw):
        kw.setdefault("description", doc.strip().splitlines()[0] if doc else None)  # the docstring's line
        super().__init__(formatter_class=kw.pop("formatter_class", HelpFormatter), **kw)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_float(text):
    """argparse type: a finite float above 0 (a learning rate: inf or nan would break the run and its JSON)."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def finite_float(text):
    """argparse type: a finite float (nan and inf cannot be stored in the JSON records, nor mean anything)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_range(lo, hi=None, step=None):
    """argparse type: an int in [lo, hi] (hi None: no upper bound), on the grid lo + k * step if given."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi) or (step and (value - lo) % step):
            grid = f" in steps of {step}" if step else ""
            bound = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}{grid}, got {value}")
        return value
    return parse


seed = int_range(0, SEED_MAX)


def nonblank(text):
    """argparse type: text with something other than white space."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty or blank: say what to do, e.g. \"remove the rain\"")
    return text


def _reason(e):
    """An OSError in words: 'permission denied', 'read-only file system', ..."""
    words = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device"}
    return words.get(e.errno, (e.strerror or str(e)).lower())


def check_writable(path, flag="--output", is_file=False):
    """Refuse (UsageError) an output that cannot be written, before any work is done: a probe file is created
    and removed in the folder `path` (is_file: in the folder of the file `path`), or in the nearest existing
    folder above it when it does not exist yet (nothing else is created)."""
    folder = os.path.abspath(path)
    if is_file and os.path.isfile(folder):  # a file to be replaced: what matters is its folder
        folder = os.path.dirname(folder)
    try:
        probe_writable(folder)
    except NotADirectoryError as e:
        raise UsageError(f"cannot write to {flag} {path}: {e} is a file, not a folder") from None
    except OSError as e:
        raise UsageError(f"cannot write to {flag} {path}: {_reason(e)}") from None


def minidiff_version():
    """The installed minidiff's version, for the records ("unknown" when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("minidiff")
    except PackageNotFoundError:
        return "unknown"


def one_line(e):
    """The message of a user-facing error on one line; OSErrors in words, naming the file."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {_reason(e)}" if e.filename else _reason(e)
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# The exit statuses (the module docstring; README "Exit status"): the first class that matches wins.
DONE, FAILED, USAGE, NON_FINITE, INTERRUPTED, TERMINATED = 0, 1, 2, 3, 130, 143
EXIT_STATUS = (
    (UsageError, USAGE),            # a refused request: flags that conflict, an output that cannot be written
    (ImageError, USAGE),            # an input photo that cannot be used
    (MetricsError, USAGE),          # evaluation inputs: empty folder, mismatched or non-finite statistics
    (NonFiniteError, NON_FINITE),   # NaN/inf latents or loss
    (CheckpointError, FAILED),      # weights unreadable or not the model they should be
    (PluginMismatchError, FAILED),  # a plugin for another base model
    (MissingPlugins, FAILED),       # plugin files not there
    (DownloadError, FAILED),        # network, HTTP status, size or hash mismatch
    (OSError, FAILED),              # any other file problem (missing, permission, disk full)
    (MemoryError, FAILED),          # out of host memory
    (torch.OutOfMemoryError, FAILED),
)


def exit_status(e):
    """The exit status of an exception by EXIT_STATUS, or None for a bug (which keeps its traceback). A
    RuntimeError saying "out of memory" (the CPU allocator's) counts as out of memory."""
    for cls, code in EXIT_STATUS:
        if isinstance(e, cls):
            return code
    memory = ("out of memory", "not enough memory")
    if isinstance(e, RuntimeError) and any(w in str(e).lower() for w in memory):
        return FAILED
    return None


def run(main, argv=None):
    """Call main(argv) and turn its outcome into the exit statuses above, each with one line on stderr;
    returns the exit status. SIGTERM raises Terminated in the main thread, so `finally` blocks and atomic
    writes clean up as for Ctrl-C."""
    def on_sigterm(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return main(argv) or DONE
    except KeyboardInterrupt:
        print("interrupted: no partial output was left behind", file=sys.stderr)
        return INTERRUPTED
    except Terminated:
        print("terminated: no partial output was left behind", file=sys.stderr)
        return TERMINATED
    except Exception as e:
        code = exit_status(e)
        if code is None:
            raise
        memory = "memory" in type(e).__name__.lower() or "memory" in str(e).lower()
        hint = " (try a smaller size or --max-side, or --dtype fp16 on a GPU, bf16 on a CPU)" if memory else ""
        print(f"error: {one_line(e)}{hint}", file=sys.stderr)
        return code


# --dtype names -> torch dtypes (weights and activations of the inference tools)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_device_flags(a, dtype=True):
    """--device and (dtype: True) --dtype, as every tool takes them (a: parser.add_argument)."""
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    if not dtype:
        return
    a("--dtype", choices=["auto", *DTYPES], default="fp32",
      help="weights and activations precision; auto: fp16 on CUDA, bf16 on a CPU with native bf16 "
           "(AVX-512 BF16 or AMX), else fp32. fp32 is the default: the same numbers on every machine")


def checkpoints_root(repo):
    """The checkpoints folder the tools look in: $MINIDIFF_CHECKPOINTS, else <repo>/checkpoints."""
    return os.environ.get("MINIDIFF_CHECKPOINTS") or os.path.join(repo, "checkpoints")


def default_weights(args, repo, published):
    """--model and the default weight paths of a tool: `published` maps its flags to the checkpoints/ layout
    (e.g. {"sd": "sd14", "clip": "clip"}); --model small, or auto without those files, takes the small
    family instead (checked against its manifest; auto prints one notice line). Flags given on the command
    line are kept (and mean "published": your own files). Sets args.model ("published" or "small") and
    args.model_side (the family's working short side)."""
    from minidiff.download import default_checkpoint_paths
    from minidiff.family import SMALL, choose_model, small_paths, small_working_size, verify_small
    root = checkpoints_root(repo)
    explicit = any(getattr(args, flag, None) for flag in published if flag in ("sd", "clip"))
    model, notice = ("published", None) if explicit and args.model == "auto" else \
        choose_model(args.model, root, tuple(published.values()))
    if model == "small":
        folder = os.path.join(root, SMALL)
        verify_small(folder, tuple(published))
        defaults, args.model_side = small_paths(folder), small_working_size(folder)
        if notice:
            print(notice, file=sys.stderr)
    else:
        paths = default_checkpoint_paths(root)
        defaults, args.model_side = {flag: paths[key] for flag, key in published.items()}, 512
    for flag in published:
        setattr(args, flag, getattr(args, flag, None) or defaults[flag])
    args.model = model


def add_model_flag(a):
    """--model auto|small|published (minidiff/family.py): which weights run when --sd/--clip are not given."""
    a("--model", choices=["auto", "small", "published"], default="auto",
      help="auto: the published weights when checkpoints/ has them, else minidiff's small family "
           "(checkpoints/small, trained by tools/train_small.py); small; published")


def add_restoration_weight_flags(a):
    """--sd, --clip, --plugins, --selector: the weights of Diff-Plugin restoration (sample.py, serve.py)."""
    a("--sd", help="Stable Diffusion 1.x base, single file or diffusers folder "
                   "(default: checkpoints/stable-diffusion-v1-4, the official plugins' base)")
    a("--clip", help="CLIP ViT-L/14 vision weights (default: under checkpoints/)")
    a("--plugins", help="folder of plugins: official <task>/ folders or <task>.safetensors")
    a("--selector", help="plugin selector: official PromptTunner.pt or a minidiff .safetensors")


def pick_device(name):
    """--device "auto" -> "cuda" when available, else "cpu"; "cuda" where there is none: UsageError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return name


def resolve_device(args):
    """args.device "auto" -> "cuda" or "cpu", args.dtype "auto" -> fp16 (CUDA), bf16 (a CPU with native bf16,
    minidiff.io.cpu.native_bf16) or fp32; refuse CUDA where there is none, fp16 on the CPU and (where the tool
    has --compile) compiling on the CPU; warn (stderr) that bf16 on a CPU without native bf16 is slower than
    fp32. Returns the torch dtype of --dtype."""
    args.device = pick_device(args.device)
    if args.dtype == "auto":
        args.dtype = "fp16" if args.device == "cuda" else "bf16" if native_bf16() else "fp32"
    if args.device == "cpu" and args.dtype == "fp16":
        raise UsageError("--dtype fp16 needs --device cuda; use fp32 or bf16 on the CPU")
    if args.device == "cpu" and args.dtype == "bf16" and not native_bf16():
        print("warning: --dtype bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX), so bf16 runs slower "
              "than fp32 here", file=sys.stderr)
    if getattr(args, "compile", False) and args.device == "cpu":
        raise UsageError("--compile is for GPUs: on a CPU compiling costs far more than it saves "
                         "(a 1-step restore took 407 s instead of 3.9 s); drop --compile")
    return DTYPES[args.dtype]
