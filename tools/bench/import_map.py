"""The import map of minidiff/: which layer imports which, and every import that runs upward.

Each folder of minidiff/ is a layer; a module may import its own layer and the layers below it, never one
above. Imports inside functions count too (they are read from the syntax tree, not executed).

    python tools/bench/import_map.py            # the table, the upward imports (exit 1 if any)
    python tools/bench/import_map.py --json     # the same as JSON
"""
import ast
import json
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# lowest first; the package's top-level files (the public API, fake models, the downloader) sit on top
LAYERS = ["errors", "models", "io", "diffusion", "eval", "plugin", "train", "top"]
FLOOR = {"errors": 0, "models": 1, "io": 2, "diffusion": 3, "eval": 3, "plugin": 4, "train": 5, "top": 6}


def layer_of(module):
    """'minidiff.models.unet' -> 'models'; 'minidiff.errors' -> 'errors'; 'minidiff.fake' -> 'top'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    return parts[1] if parts[1] in FLOOR else "top"


def module_imports(path, module):
    """The minidiff modules one file imports (absolute and relative, anywhere in the file)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("minidiff")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("minidiff"):
                found += [f"{name}.{a.name}" if name == "minidiff" else name for a in node.names]
    return found


def import_map(root=ROOT):
    """{(from_layer, to_layer): count} and the list of upward imports (file, imported module)."""
    edges, upward = Counter(), []
    for folder, _, files in os.walk(os.path.join(root, "minidiff")):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
            src = layer_of(module) if name != "__init__.py" or module.count(".") > 1 else "top"
            for target in module_imports(path, module):
                dst = layer_of(target)
                edges[(src, dst)] += 1
                if FLOOR[dst] > FLOOR[src] or (FLOOR[dst] == FLOOR[src] and dst != src):
                    upward.append((rel, target))
    return edges, upward


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    edges, upward = import_map()
    if "--json" in argv:
        print(json.dumps({"edges": [[a, b, n] for (a, b), n in sorted(edges.items())],
                          "upward": upward}, indent=1))
    else:
        print("from \\ to   " + " ".join(f"{l:>9}" for l in LAYERS))
        for a in LAYERS:
            print(f"{a:<12}" + " ".join(f"{edges.get((a, b), 0) or '.':>9}" for b in LAYERS))
        print(f"imports that run upward: {len(upward)}")
        for rel, target in upward:
            print(f"  {rel} -> {target}")
    return 1 if upward else 0


if __name__ == "__main__":
    sys.exit(main())
