"""Importing minidiff stays light: no reference library, no vocabulary, no weights.

Each check runs in a fresh interpreter (a clean sys.modules): `import minidiff`, then every submodule found
in minidiff/ and its layer folders (pkgutil.walk_packages, so modules added later are covered too), then the command-line tools in tools/.
None of them may pull in the reference libraries used only by the tests (diffusers, transformers, open_clip,
huggingface_hub, clean-fid, pytorch-fid, torchvision), and importing may open no vocabulary or weight file.

    python -m pytest tests/test_import.py -q
"""
import json
from pathlib import Path

from helpers import python_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ["diffusers", "transformers", "open_clip", "huggingface_hub", "cleanfid", "pytorch_fid",
             "torchvision", "accelerate", "clip"]
# tools/bench/benchmark.py times minidiff against diffusers by design (it imports diffusers when it is installed)
TOOLS_ALLOWED_REFERENCE = {"benchmark.py"}

# Run in the subprocess: records every file opened while importing, then reports what got loaded.
PRELUDE = """
import importlib, importlib.util, json, pkgutil, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
def report(**extra):
    data_files = [p for p in opened if p.endswith((".gz", ".safetensors", ".bin", ".pt", ".pth", ".ckpt"))]
    tops = sorted({m.split(".")[0] for m in sys.modules})
    print(json.dumps(dict(modules=tops, data_files=data_files, **extra)))
"""


def _run(code):
    # the working tree first on sys.path, whatever the current directory and the installed copy
    head = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    proc = python_in_subprocess(head + PRELUDE + code, timeout=300)
    assert proc.returncode == 0, f"import failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result, what):
    leaked = [m for m in FORBIDDEN if m in result["modules"]]
    assert not leaked, f"{what} imported {leaked}"
    assert not result["data_files"], f"{what} opened data files at import: {result['data_files']}"


def test_import_minidiff_is_light():
    # plain imports: the public names are ordinary attributes (no module __getattr__), and the tokenizer's
    # vocabulary is read only when a CLIPTokenizer is made (its .gz is among the data files _check refuses)
    result = _run("import minidiff\n"
                  "from minidiff.models.tokenizer import VOCAB_PATH\n"
                  "report(lazy=hasattr(minidiff, '__getattr__'), vocab=str(VOCAB_PATH),\n"
                  "       missing=[n for n in minidiff.__all__ if n not in vars(minidiff)])")
    _check(result, "import minidiff")
    assert result["vocab"].endswith(".gz"), result["vocab"]
    assert not result["lazy"] and not result["missing"], f"names not imported plainly: {result['missing']}"


def test_every_submodule_and_public_name():
    # every public name of minidiff/__init__.py must resolve, and importing every module loads no data
    result = _run("import minidiff\n"
                  "names = sorted(m.name for m in pkgutil.walk_packages(minidiff.__path__, 'minidiff.'))\n"
                  "for name in names:\n"
                  "    importlib.import_module(name)\n"
                  "unresolved = [n for n in minidiff.__all__ if not hasattr(minidiff, n)]\n"
                  "report(names=names, unresolved=unresolved)")
    print(f"[import] submodules: {', '.join(result['names'])}")
    assert "minidiff.models.tokenizer" in result["names"]
    _check(result, "importing every minidiff submodule")
    assert not result["unresolved"], f"minidiff.__all__ names that do not resolve: {result['unresolved']}"


def test_tools_do_not_import_reference_libraries():
    tools = sorted(p for p in (ROOT / "tools").glob("*.py") if p.name not in TOOLS_ALLOWED_REFERENCE)
    code = ("import sys\n"
            f"sys.path.insert(0, {str(ROOT / 'tools')!r})\n"
            f"for path in {[str(p) for p in tools]!r}:\n"
            "    spec = importlib.util.spec_from_file_location('tool_' + path.split('/')[-1][:-3], path)\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "report()")
    _check(_run(code), f"importing tools {[p.name for p in tools]}")
