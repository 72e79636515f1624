"""tools/sample.py's rough edges (issue 10, section 2), each as a user meets it: a subprocess with tiny
weights asserting the exit code, one line on stderr, no traceback and no leftovers (or the warning and the
record). Each failed before its fix. Also every tool's --help (one description, each default once).
    python -m pytest tests/test_sample_edges.py -q
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_sample import ROOT, SCRIPT, photo, sample
from minidiff.io.imageio import DEFAULT_MAX_SIDE


def one_error_line(proc, code):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, proc.stderr
    assert lines[0].startswith(("error: ", "sample.py: error: ")), proc.stderr  # run / command line
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny models as files: an SD single file, CLIP vision, a NaN 'derain' trained on that SD, and a
    'deblur' trained on another one."""
    from safetensors.torch import save_file
    from minidiff.plugin.fake import fake_models
    from minidiff.plugin.files import save_plugin
    root = tmp_path_factory.mktemp("weights")
    m = fake_models(["derain", "deblur"], with_selector=False)
    parts = {"model.diffusion_model.": m.sd.unet, "first_stage_model.": m.sd.vae,
             "cond_stage_model.transformer.": m.sd.text_encoder}
    save_file({p + k: v.contiguous() for p, mod in parts.items() for k, v in mod.state_dict().items()},
              root / "sd.safetensors")
    save_file({k: v.contiguous() for k, v in m.clip_vision.state_dict().items()}, root / "clip.safetensors")
    torch.nn.init.constant_(m.plugins["derain"].scb.zero_convs[0].bias, float("nan"))
    for task, base in (("derain", "sd.safetensors"), ("deblur", "sd-x")):
        save_plugin(m.plugins[task], root / "plugins" / f"{task}.safetensors", {"base_model": base})
    return ["--sd", root / "sd.safetensors", "--clip", root / "clip.safetensors",
            "--plugins", root / "plugins"]


BAD_VALUES = {  # flag values that cannot be stored or run -> words of the one-line message (exit 2)
    "--threshold nan": "finite", "--seed 9223372036854775808": "must be 0..9223372036854775807",
    "--max-side 8": "0 (no cap) or at least 64", "--max-side -1": "0 (no cap) or at least 64",
    "--short-side 500": "64..1024 in steps of 64", "--steps 0": "must be 1..1000",  # 64: the small family
}


@pytest.mark.parametrize("flag", BAD_VALUES)
def test_values_refused_up_front(tmp_path, flag):
    src = photo(tmp_path / "p.png")
    proc = sample("--input", src, "--task", "derain", *flag.split(), "--output", tmp_path / "o")
    line = one_error_line(proc, 2)
    assert BAD_VALUES[flag] in line and not (tmp_path / "o").exists(), line


def test_refused_before_any_weight_is_loaded(tmp_path):
    src = photo(tmp_path / "p.png")
    (tmp_path / "file").write_text("x")
    cases = {  # arguments -> words of the message (exit 1)
        ("--task", "derain", "--output", tmp_path / "file" / "o"): "is a file, not a folder",
        ("--prompts", tmp_path / "nope.json", "--output", tmp_path / "o"): "--prompts",
        ("--task", "derain", "--compile", "--device", "cpu", "--output", tmp_path / "o"): "for GPUs",
    }
    if Path("/sys").is_dir() and not Path("/sys").stat().st_mode & 0o222:  # sysfs: EACCES even for root
        cases[("--task", "derain", "--output", "/sys/minidiff-out")] = "permission denied"
    for args, words in cases.items():
        line = one_error_line(sample("--input", src, *args, fake=False), 2)  # UsageError
        assert words in line, line
    assert sorted(os.listdir(tmp_path)) == ["file", "p.png"]
    tall = photo(tmp_path / "tall.png", size=(3000, 1))  # the default cap makes it DEFAULT_MAX_SIDE x 8
    line = one_error_line(sample("--input", tall, "--task", "derain", "--output", tmp_path / "o"), 2)
    assert f"{DEFAULT_MAX_SIDE}x8" in line and "under 64 px" in line and not (tmp_path / "o").exists()


def test_empty_folders_are_not_weights(tmp_path):
    """An interrupted download leaves folders: they are reported missing, file by file."""
    for d in ("sd/unet", "sd/vae", "sd/text_encoder", "clip", "plugins/derain/scb"):
        (tmp_path / d).mkdir(parents=True)
    proc = sample("--input", photo(tmp_path / "p.png"), "--task", "derain", "--sd", tmp_path / "sd",
                  "--clip", tmp_path / "clip", "--plugins", tmp_path / "plugins", "--output", tmp_path / "o",
                  fake=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    for missing in ("unet/diffusion_pytorch_model.safetensors", "clip/model.safetensors", "derain"):
        assert missing in proc.stderr, proc.stderr


def test_non_finite_result_writes_nothing(tmp_path, weights):
    out = tmp_path / "o"
    proc = sample("--input", photo(tmp_path / "p.png"), "--task", "derain", "--steps", 1, "--max-side", 96,
                  *weights, "--output", out, fake=False)
    line = one_error_line(proc, 3)  # NonFiniteError
    assert "'derain': the latent is not finite after step 1 of 1" in line and not out.exists(), line


def test_base_mismatch_is_warned_and_recorded(tmp_path, weights):
    proc = sample("--input", photo(tmp_path / "p.png"), "--task", "deblur", "--steps", 1, "--max-side", 96,
                  *weights, "--output", tmp_path / "o", fake=False)
    assert proc.returncode == 0 and "trained on sd-x, but the base is sd.safetensors" in proc.stderr
    rec = json.loads((tmp_path / "o" / "p.json").read_text())
    assert rec["base_model"]["plugins_trained_on"] == {"deblur": "sd-x"} and rec["base_model_warning"]


def test_silent_changes_are_warned_and_recorded(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    frames = [Image.new("RGB", (80, 64), c) for c in ("red", "blue")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    photo(src / "dot.png", size=(1, 1))
    long = "please remove the rain " * 20  # 100 tokens
    proc = sample("--input", src, "--prompt", long, "--steps", 2, "--dry-run", "--output", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert ".json (dry run: no image)" in proc.stdout and "{png" not in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    anim, dot = (json.loads((tmp_path / "o" / f"{n}.json").read_text()) for n in ("anim", "dot"))
    assert any("first of its 2 frames" in w for w in anim["warnings"])
    assert any("CLIP reads the first 75" in w for w in anim["warnings"])
    assert any("1x1 photo upscaled 512x" in w for w in dot["warnings"])
    assert len(warnings) == len(anim["warnings"]) + len(dot["warnings"]) == 5, warnings
    assert anim["chain_steps"] == 3 and anim["chain_steps_used"] == 2  # a quick try stays quick


def test_reruns_clean_up_and_skip_done_photos(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir(), out.mkdir()
    photo(src / "a.png"), photo(src / "b.png")
    (out / ".a.png.k3j4h5g6.tmp").write_bytes(b"")  # what SIGKILL left behind
    (out / ".notes.txt.k3j4h5g6.tmp").write_bytes(b"")  # not ours to remove
    (out / "b.json").write_text("{}")  # b is done: its record, written last, exists
    proc = sample("--input", src, "--task", "deblur", "--dry-run", "--skip-existing", "--output", out)
    assert proc.returncode == 0 and "1 of 2 photo(s)" in proc.stdout and "removed 1 stale" in proc.stdout
    assert sorted(os.listdir(out)) == [".notes.txt.k3j4h5g6.tmp", "a.json", "b.json"]
    assert (out / "b.json").read_text() == "{}"


def test_sigterm_leaves_no_temporary_file(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--fake-weights", "--no-progress",
           "--input", photo(tmp_path / "p.png"), "--task", "deblur", "derain", "--steps", 50,
           "--output", tmp_path / "o"]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while "models ready" not in proc.stdout.readline():
        assert proc.poll() is None, proc.stderr.read()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["terminated: no partial output was left behind"]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("tool", ["sample.py", "generate.py", "evaluate.py", "convert.py", "download.py",
                                  "make_examples.py"])
def test_help_has_a_description_and_each_default_once(tool):
    folder = ROOT / "tools" / ("bench" if tool == "make_examples.py" else "")  # the workshop: tools/bench/
    proc = subprocess.run([sys.executable, str(folder / tool), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "(default: None)" not in proc.stdout
    description = proc.stdout.split("\n\n")[1]
    assert description.strip() and not description.startswith(("options:", "positional")), proc.stdout
    entries = proc.stdout.split("\n  -")[1:]
    assert all(e.count("(default") <= 1 for e in entries), [e for e in entries if e.count("(default") > 1]
