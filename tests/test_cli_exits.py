"""Every tool speaks one way (tools/_cli.py, README "Exit status"): a bad flag or value is ONE line
"<tool>: error: ..." and exit 2; a refused run is one line "error: ..." with the status of the one table
(1 failed, 2 usage or data, 3 non-finite); Ctrl-C gives 130 and SIGTERM 143, one line each. Also the
command-line items of issue 20 section 3 (--lr inf/nan, --batch-size over the data, --threshold nan,
--instructions naming the file, serve --examples /missing, no "(default: None)", byte-identical plugin files).
Subprocesses as a user runs them; each stops before any model is built (a few seconds).

    python -m pytest tests/test_cli_exits.py -q
"""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ["sample", "serve", "generate", "train", "train_selector", "eval_selector", "evaluate", "convert",
         "download"]
BENCH = ["function_lengths", "make_examples"]  # the other tools/bench scripts: plain argparse still


def tool(name, *args, timeout=120):
    path = os.path.join(ROOT, "tools", *(["bench"] if name in BENCH else []), f"{name}.py")
    return subprocess.run([sys.executable, path, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_line(proc, code, start="error: "):
    """The run stopped with `code` and one line on stderr starting with `start`; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith(start), \
        (proc.returncode, proc.stderr[-2000:])
    return lines[0]


@pytest.mark.parametrize("name", TOOLS + BENCH)
def test_bad_flag_is_one_line_exit_2(name):
    line = one_line(tool(name, "--no-such-flag"), 2, f"{name}.py: error: ")
    assert f"see {name}.py --help" in line  # generate.py first names its missing mode, the others the flag


@pytest.fixture
def photos(tmp_path):
    """8 random 64x64 photos (clean only: the training tools make the inputs with --degrade)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


# one refused run per tool: (argv, exit status, words of the one line)
def failures(tmp, photos):
    (tmp / "file").write_text("x")
    (tmp / "bad.json").write_text("{not json")
    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    photo = photos / "p0.png"
    return {
        "sample": (["--fake-weights", "--input", tmp / "missing.png", "--task", "derain"], 2, "missing.png"),
        "serve": (["--fake-weights", "--examples", tmp / "missing"], 2, "--examples"),
        "generate": (["txt2img", "--fake-weights", "--prompt", "car", "--output", tmp / "file" / "o.png"], 2,
                     "cannot write to --output"),
        "train": (["--fake-weights", "--task", "deblur", "--degrade", "deblur", "--data", photos, "--output",
                   tmp / "run", "--batch-size", "100000"], 2, "--allow-repeat"),
        "train_selector": (["--fake-weights", "--output", tmp / "sel", "--instructions", tmp / "bad.json"], 2,
                           "bad.json"),
        "eval_selector": (["--fake-weights", "--selector", tmp / "missing.safetensors"], 2, "not found"),
        "evaluate": (["--restored", photos, "--reference", photos, "--weights", tmp / "nope.pth", "--json",
                      tmp / "o.json"], 1, "nope.pth"),
        "convert": ([tmp / "missing", tmp / "o.safetensors"], 1, "missing"),
        "download": (["--no-progress", "--dir", tmp / "ckpt", "--base-url", f"http://127.0.0.1:{port}"], 1,
                     "could not reach"),
    }


@pytest.mark.parametrize("name", TOOLS)
def test_refused_run_is_one_line(name, tmp_path, photos):
    argv, code, words = failures(tmp_path, photos)[name]
    proc = tool(name, *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and words in lines[0], (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("name", ["train", "train_selector"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1e-5", "0"])
def test_lr_refused_in_one_line(name, value, tmp_path):
    line = one_line(tool(name, "--fake-weights", "--task", "x", "--data", tmp_path, "--output", tmp_path / "o",
                         "--lr", value) if name == "train" else
                    tool(name, "--fake-weights", "--output", tmp_path / "o", "--lr", value), 2, f"{name}.py: error: ")
    assert "argument --lr: must be" in line and not (tmp_path / "o").exists()


def test_threshold_nan_refused():
    line = one_line(tool("eval_selector", "--selector", "x", "--threshold", "nan"), 2, "eval_selector.py: error: ")
    assert "--threshold: must be a finite number" in line


@pytest.mark.parametrize("name", TOOLS)
def test_help_shows_no_none_default(name):
    proc = tool(name, "--help")
    assert proc.returncode == 0 and "(default: None)" not in proc.stdout and "usage:" in proc.stdout


def test_ctrl_c_in_training_is_130_and_one_line(tmp_path, photos):
    """SIGINT to a training run on --fake-weights (as Ctrl-C sends it): exit 130, one line, no traceback."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--fake-weights", "--task", "deblur",
           "--degrade", "deblur", "--data", str(photos), "--output", str(tmp_path / "run"), "--steps", "100000",
           "--resolution", "32", "--batch-size", "2", "--val-pairs", "0", "--validate-every", "0",
           "--num-workers", "0", "--checkpoint-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:  # the run has started: its settings line is printed before the models are built
        if line.startswith("train deblur:"):
            break
    proc.send_signal(signal.SIGINT)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    lines = [l for l in err.strip().splitlines() if not l.startswith(("train:", "\r"))]  # progress bar
    assert code == 130 and lines[-1].startswith("interrupted: ") and "Traceback" not in err, (code, err[-2000:])


def test_negative_numbers_parse_as_values():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import _cli
    p = _cli.OneLineParser(prog="t.py")
    p.add_argument("--lr", type=float)
    p.add_argument("--shift", type=int)
    for text, want in (("-1e-5", -1e-5), ("-2.5", -2.5), ("-.5", -0.5), ("-3E+2", -300.0)):
        assert p.parse_args(["--lr", text]).lr == want
    assert p.parse_args(["--shift", "-3"]).shift == -3


def test_exit_status_table():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import _cli
    from minidiff import errors
    want = {errors.UsageError: 2, errors.ImageError: 2, errors.MetricsError: 2, errors.NonFiniteError: 3,
            errors.CheckpointError: 1, errors.PluginMismatchError: 1, errors.DownloadError: 1}
    for cls, code in want.items():
        assert _cli.exit_status(cls("x")) == code, cls
    assert _cli.exit_status(errors.MissingPlugins(["a"])) == 1
    assert _cli.exit_status(FileNotFoundError(2, "no such file", "x")) == 1
    assert _cli.exit_status(RuntimeError("CPU: out of memory")) == 1
    assert _cli.exit_status(KeyError("a bug")) is None  # a bug keeps its traceback


def test_plugin_file_is_byte_identical_across_runs(tmp_path):
    """safetensors keeps metadata in a Rust HashMap (random order per process): save_plugin sorts it."""
    code = ("import sys; sys.path.insert(0, {root!r})\n"
            "from minidiff.plugin.fake import fake_models\n"
            "from minidiff.plugin.files import save_plugin\n"
            "m = fake_models(['derain'], with_selector=False)\n"
            "save_plugin(m.plugins['derain'], sys.argv[1], {{'base_model': 'b', 'task': 'derain', 'steps_trained': 3,"
            " 'zz': 1, 'aa': 2}})\n").format(root=ROOT)
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True, timeout=120)
    data = [(tmp_path / f"{i}.safetensors").read_bytes() for i in range(3)]
    assert data[0] == data[1] == data[2]
    size = int.from_bytes(data[0][:8], "little")
    meta = json.loads(data[0][8:8 + size])["__metadata__"]
    assert list(meta) == sorted(meta)
