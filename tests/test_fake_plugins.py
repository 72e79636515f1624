"""A plugin trained on fake weights, tried from the command line (issue 20, section 3): tools/sample.py and
tools/serve.py with --fake-weights load a typed --plugins folder and --selector file over the random base,
record their hashes, refuse a path that does not exist (exit 2) and a file that does not fit (exit 1), each
in one line. Before the fix both flags were ignored under --fake-weights (even missing paths exited 0).
About 40 s on 2 CPU cores:
    python -m pytest tests/test_fake_plugins.py -q
"""
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from test_sample import ROOT, pixels, photo, sample
from test_serve import call, upload, wait
from web import Server

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def one_error_line(proc, code):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tools/train.py --fake-weights: a 2-step deblur plugin trained on 6 small photos -> (run folder, data)."""
    data = tmp_path_factory.mktemp("photos")
    for i in range(6):
        photo(data / f"p{i}.png", size=(96, 96), seed=i)
    out = tmp_path_factory.mktemp("runs") / "deblur"
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--fake-weights", "--steps", "2", "--resolution",
           "64", "--batch-size", "2", "--degrade", "deblur", "--data", str(data), "--task", "deblur",
           "--output", str(out), "--num-workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "deblur.safetensors").is_file()
    return out, data


def test_sample_runs_the_trained_plugin_and_records_it(trained, tmp_path):
    run, data = trained
    common = ["--input", data / "p0.png", "--task", "deblur", "--steps", 2, "--max-side", 64]
    proc = sample(*common, "--plugins", run, "--output", tmp_path / "mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "mine" / "p0.json").read_text())
    plugin = run / "deblur.safetensors"
    assert rec["tasks"] == ["deblur"] and rec["fake_weights"] is True
    assert rec["checkpoints"] == {"plugin:deblur": {"path": str(plugin), "sha256": sha256(plugin)}}
    proc = sample(*common, "--output", tmp_path / "random")  # no --plugins: the random fake plugin
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "random" / "p0.json").read_text())["checkpoints"] == {}
    # the trained file made the picture: it differs from the random plugin's, on the same base and seed
    assert np.abs(pixels(tmp_path / "mine" / "p0.png").astype(int) -
                  pixels(tmp_path / "random" / "p0.png").astype(int)).max() > 0


def test_sample_selector_file_and_the_folders_plugins(trained, tmp_path):
    """--prompt: the selector chooses among the folder's plugins only (deblur), and a typed selector file is
    the one that scores (its hash in the record; a different selector gives different scores)."""
    from minidiff.plugin.files import save_selector
    from minidiff.plugin.selector import PluginSelector
    run, data = trained
    torch.manual_seed(1)
    save_selector(PluginSelector(128), tmp_path / "selector.safetensors")  # 128: the tiny text width
    common = ["--input", data / "p0.png", "--prompt", "remove the blur", "--dry-run", "--plugins", run]
    proc = sample(*common, "--selector", tmp_path / "selector.safetensors", "--output", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "a" / "p0.json").read_text())
    assert list(rec["scores"]) == ["deblur", "null"]
    assert set(rec["checkpoints"]) == {"plugin:deblur", "selector"}
    assert rec["checkpoints"]["selector"]["path"] == str(tmp_path / "selector.safetensors")
    proc = sample(*common, "--output", tmp_path / "b")  # the random fake selector
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = json.loads((tmp_path / "b" / "p0.json").read_text())["scores"]
    assert list(other) == ["deblur", "null"] and other != rec["scores"]


def test_sample_refuses_missing_and_unfitting_files(trained, tmp_path):
    from minidiff.plugin.files import save_plugin, save_selector
    from minidiff.plugin.plugin import SCB, TINY_PLUGIN, TPB, TaskPlugin
    from minidiff.plugin.selector import PluginSelector
    run, data = trained
    src = ["--input", data / "p0.png", "--output", tmp_path / "o", "--steps", 2, "--max-side", 64]
    cases = {  # flags -> (exit status, words of the one line)
        "missing plugins": (["--task", "deblur", "--plugins", tmp_path / "nope"], 2, "--plugins"),
        "missing selector": (["--prompt", "x", "--selector", tmp_path / "nope.safetensors"], 2, "--selector"),
        "task not in the folder": (["--task", "derain", "--plugins", run], 2, "no plugin file for derain"),
    }
    cfg = replace(TINY_PLUGIN, clip_dim=64, context_dim=128, channels=32)  # the fake CLIP vision is wider
    (tmp_path / "wide").mkdir()
    save_plugin(TaskPlugin("deblur", TPB(cfg), SCB(cfg)), tmp_path / "wide" / "deblur.safetensors")
    save_selector(PluginSelector(64), tmp_path / "sel64.safetensors")
    cases["plugin of other widths"] = (["--task", "deblur", "--plugins", tmp_path / "wide"], 1, "does not fit")
    cases["selector of another width"] = (["--prompt", "x", "--plugins", run, "--selector",
                                           tmp_path / "sel64.safetensors"], 1, "does not fit")
    for case, (flags, code, words) in cases.items():
        line = one_error_line(sample(*src, *flags), code)
        assert words in line, (case, line)
        assert not (tmp_path / "o" / "p0.png").exists(), case
        print(f"[{case}] {line}")


def test_serve_loads_the_trained_plugin(trained, tmp_path):
    run, data = trained
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "serve.py"), "--fake-weights", "--port", "0",
                           "--plugins", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                          env=ENV)
    assert "--plugins" in one_error_line(proc, 2)
    with Server("--fake-weights", "--max-side", "64", "--plugins", str(run)) as url:
        assert call(url + "/api/info")[1]["tasks"] == ["deblur"]
        body = {"upload": upload(url), "prompt": "remove the blur", "steps": 2, "seed": 7}
        job = wait(url, call(url + "/api/jobs", "POST", body)[1]["id"])[0]
        assert job["state"] == "done", job
        record = job["record"]
        plugin = run / "deblur.safetensors"
        assert list(record["scores"]) == ["deblur", "null"]
        assert record["checkpoints"]["plugin:deblur"] == {"path": str(plugin), "sha256": sha256(plugin)}
