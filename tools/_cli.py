"""What minidiff's tools share: one-line errors, the exit codes, argument types, the up-front output check.

Exit codes of tools/sample.py, generate.py, evaluate.py, convert.py, download.py and make_examples.py:
    0    done
    1    stopped with one line "error: ..." on stderr: a request the tool refuses (conflicting flags, a
         combination out of range), a missing or unreadable input, missing weights, a failed download, an
         output that cannot be written, a non-finite result, out of memory
    2    the command line does not parse: an unknown flag, a value of the wrong type or outside its range
         (a non-finite number, a seed outside 0..2^63-1, a size under the smallest): one line too
    130  interrupted by Ctrl-C; 143 stopped by SIGTERM. Either way nothing half-written is left behind.
This module is a helper of the scripts beside it (not a script). Its UsageError is minidiff.train.trainer's, the
project's one class for a refused request (the training tools exit with 2 on it: see their docstrings).
"""
import argparse
import errno
import math
import os
import signal
import sys

import torch

from minidiff.io.cpu import native_bf16
from minidiff.io.files import probe_writable
from minidiff.io.imageio import ImageError
from minidiff.train.trainer import NonFiniteLoss, UsageError
from minidiff.io.weights import CheckpointError

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


class OneLineParser(argparse.ArgumentParser):
    """argparse with one line on stderr for a command line that does not parse (exit status 2)."""

    def __init__(self, doc="", **kw):
        kw.setdefault("description", doc.splitlines()[0] if doc else None)  # the script's docstring line
        super().__init__(formatter_class=kw.pop("formatter_class", HelpFormatter), **kw)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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


def is_user_error(e):
    """Errors the user can act on (arguments, files, weights, memory, a non-finite result): one line on
    stderr instead of a traceback. Anything else is a bug and keeps its traceback."""
    if isinstance(e, (UsageError, OSError, MemoryError)):
        return True
    memory = ("out of memory", "not enough memory")
    if isinstance(e, RuntimeError) and any(w in str(e).lower() for w in memory):
        return True  # the CPU allocator's error for a size that does not fit
    names = {"ImageError", "CheckpointError", "MetricsError", "NonFiniteError", "PluginMismatchError",
             "OutOfMemoryError", "DownloadError"}
    return type(e).__name__ in names  # by name: checking needs no import of torch or minidiff


def run(main, argv=None):
    """Call main(argv) and turn its outcome into the exit codes above; returns the exit status."""
    def on_sigterm(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted: no partial output was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: no partial output was left behind", file=sys.stderr)
        return 143
    except Exception as e:
        if not is_user_error(e):
            raise
        memory = "memory" in type(e).__name__.lower() or "memory" in str(e).lower()
        hint = " (try a smaller size or --max-side, or --dtype fp16 on a GPU, bf16 on a CPU)" if memory else ""
        print(f"error: {one_line(e)}{hint}", file=sys.stderr)
        return 1


def training_main(work, args):
    """Run a training tool's work(args) -> its exit status; errors as one "error: ..." line on stderr and
    the training tools' codes: 2 the command line or the data (UsageError, ImageError), 3 a non-finite loss
    (the last good checkpoint stays the latest), 1 unreadable weights or an I/O error."""
    try:
        return work(args)
    except (UsageError, ImageError) as e:
        code, message = 2, e
    except NonFiniteLoss as e:
        code, message = 3, e
    except (CheckpointError, OSError) as e:
        code, message = 1, e
    print(f"error: {message}", file=sys.stderr)
    return code


# --dtype names -> torch dtypes (weights and activations of the inference tools)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_device_flags(a):
    """--device and --dtype, as every inference tool takes them (a: parser.add_argument)."""
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    a("--dtype", choices=["auto", *DTYPES], default="fp32",
      help="weights and activations precision; auto: fp16 on CUDA, bf16 on a CPU with native bf16 "
           "(AVX-512 BF16 or AMX), else fp32. fp32 is the default: the same numbers on every machine")


def add_restoration_weight_flags(a):
    """--sd, --clip, --plugins, --selector: the weights of Diff-Plugin restoration (sample.py, serve.py)."""
    a("--sd", help="Stable Diffusion 1.x base, single file or diffusers folder "
                   "(default: checkpoints/stable-diffusion-v1-4, the official plugins' base)")
    a("--clip", help="CLIP ViT-L/14 vision weights (default: under checkpoints/)")
    a("--plugins", help="folder of plugins: official <task>/ folders or <task>.safetensors")
    a("--selector", help="plugin selector: official PromptTunner.pt or a minidiff .safetensors")


def resolve_device(args):
    """args.device "auto" -> "cuda" or "cpu", args.dtype "auto" -> fp16 (CUDA), bf16 (a CPU with native bf16,
    minidiff.io.cpu.native_bf16) or fp32; refuse CUDA where there is none, fp16 on the CPU and (where the tool
    has --compile) compiling on the CPU; warn (stderr) that bf16 on a CPU without native bf16 is slower than
    fp32. Returns the torch dtype of --dtype."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
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
