"""Shared test helpers: reporting comparisons, and finding the test-only reference libraries."""
import os
import subprocess
import sys

import pytest
import torch


def assert_close(actual, expected, tol, name="", scale=True):
    """Assert max|actual - expected| <= tol * (max(1, max|expected|) if scale else 1); print the sizes.

    The tolerance always sits at the call site, with a comment saying why that number.
    """
    actual = torch.as_tensor(actual).double().cpu()
    expected = torch.as_tensor(expected).double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bound = tol * (max(1.0, expected.abs().max().item()) if scale else 1.0)
    print(f"[{name}] max|diff| {diff.max().item():.3e}  mean|diff| {diff.mean().item():.3e}  "
          f"max|ref| {expected.abs().max().item():.3e}  bound {bound:.3e}")
    assert diff.max().item() <= bound, f"{name}: max|diff| {diff.max().item():.3e} > {bound:.3e}"


def oracle_python():
    """The interpreter of the oracle environment (torch + torchvision + clean-fid, pytorch-fid, open_clip).

    Those libraries need torchvision, which does not load beside the torch CPU wheel of the main test
    environment, so they live in a second virtualenv named by MINIDIFF_ORACLE_PYTHON (.ci/run builds it).
    """
    path = os.environ.get("MINIDIFF_ORACLE_PYTHON")
    if not path or not os.path.exists(path):
        pytest.skip("MINIDIFF_ORACLE_PYTHON is not set "
                    "(oracle virtualenv with torchvision, clean-fid, pytorch-fid)")
    return path


def run_oracle(script, *args, timeout=900):
    """Run a Python script in the oracle environment; return its stdout. A failure shows its stderr."""
    proc = subprocess.run([oracle_python(), script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"oracle script {script} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def python_in_subprocess(code, timeout=600):
    """Run code in a fresh interpreter of this environment (for checks on a clean sys.modules)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tools/ (the tools' private helpers such as _cli) and tools/bench/ (the benchmarks the tests import) on
# sys.path; the official-code oracle, tests/official_oracle.py, sits beside the tests and is shared with
# tools/bench/benchmark.py
for _path in (os.path.join(REPO, "tools"), os.path.join(REPO, "tools", "bench"), os.path.dirname(__file__)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def photo_folder():
    """A folder of real photos: the official demo photos beside the checkout (../shared/data/official-demo,
    varied sizes and modes) when present, else the committed examples/ (public-domain photos,
    tools/bench/make_examples.py)."""
    demo = os.path.join(os.path.dirname(REPO), "shared", "data", "official-demo")
    return demo if os.path.isdir(demo) else os.path.join(REPO, "examples")
