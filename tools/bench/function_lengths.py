"""The longest functions of tools/ (a reading-comfort check): name, lines, file, read from the syntax tree.

    python tools/bench/function_lengths.py              # functions over 40 lines, longest first
    python tools/bench/function_lengths.py --over 60    # exit 1 if any function is longer than 60 lines
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from _cli import OneLineParser  # noqa: E402 (the tools' one parser)


def function_lengths(folder):
    """[(lines, "file:function", line)] of every function (nested ones too) in folder/**/*.py."""
    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(base, name)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    size = node.end_lineno - node.lineno + 1  # decorators excluded, docstring included
                    found.append((size, f"{os.path.relpath(path, ROOT)}:{node.name}", node.lineno))
    return sorted(found, reverse=True)


def main(argv=None):
    p = OneLineParser(__doc__, prog="function_lengths.py")
    p.add_argument("--folder", default=os.path.join(ROOT, "tools"), help="folder to read")
    p.add_argument("--over", type=int, default=40, help="list functions longer than this many lines")
    args = p.parse_args(argv)
    long = [f for f in function_lengths(args.folder) if f[0] > args.over]
    for size, name, line in long:
        print(f"{size:5d}  {name} (line {line})")
    print(f"{len(long)} function(s) over {args.over} lines")
    return 1 if long and "--over" in (argv if argv is not None else sys.argv) else 0


if __name__ == "__main__":
    sys.exit(main())
