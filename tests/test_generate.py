"""tools/generate.py (plain SD txt2img / img2img) as a user runs it: a subprocess with --fake-weights.

Covers both modes' outputs and records (the assertions moved from tests/test_sample.py when the plain-SD
mode left sample.py), and the mistakes that used to end in a traceback or a silent change: a size under the
smallest or over the cap, non-finite --guidance, a seed outside the range, an existing output PNG, an
unwritable output, a NaN weight (a non-finite UNet output stops naming the step, nothing written).
    python -m pytest tests/test_generate.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minidiff.io.imageio import DEFAULT_MAX_SIDE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "generate.py"


def generate(*args, fake=True):
    cmd = [sys.executable, str(SCRIPT), *map(str, args), *(["--fake-weights"] * fake), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def photo(path, size=(24, 16), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def one_error_line(proc, code):
    """The run failed with `code`, one line on stderr, no traceback; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, proc.stderr
    # a run's refusal / the command line: "<tool>: error:", the tool being the subcommand's parser
    command_line = tuple(f"generate.py{sub}: error: " for sub in ("", " txt2img", " img2img"))
    assert lines[0].startswith(("error: ", *command_line)), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_txt2img_and_img2img(tmp_path):
    proc = generate("txt2img", "--prompt", "a red car", "--steps", 2, "--size", 64,
                    "--output", tmp_path / "car.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "car.png").size == (64, 64)
    rec = json.loads((tmp_path / "car.json").read_text())
    assert rec["mode"] == "txt2img" and rec["fake_weights"] is True and rec["scheduler"] == "ddim"
    src = photo(tmp_path / "in.png", size=(72, 40))
    proc = generate("img2img", "--input", src, "--prompt", "a painting", "--strength", 0.5,
                    "--steps", 4, "--scheduler", "euler", "--output", tmp_path / "edit.png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "edit.png").size == (72, 40)
    assert json.loads((tmp_path / "edit.json").read_text())["strength"] == 0.5
    # the same PNG again: refused without --overwrite (it used to be replaced silently)
    before = (tmp_path / "car.png").read_bytes()
    proc = generate("txt2img", "--prompt", "a blue car", "--steps", 2, "--size", 64,
                    "--output", tmp_path / "car.png")
    assert "--overwrite" in one_error_line(proc, 2) and (tmp_path / "car.png").read_bytes() == before
    proc = generate("txt2img", "--prompt", "a blue car", "--steps", 2, "--size", 64, "--overwrite",
                    "--output", tmp_path / "car.png")
    assert proc.returncode == 0 and (tmp_path / "car.png").read_bytes() != before, proc.stderr


BAD = {  # case -> (arguments, exit code, words of the message)
    "bad size": (["--size", 60], 2, "steps of 8"),
    "size under the smallest": (["--size", 8], 2, "must be at least 64"),
    "size over the cap": (["--size", 16384], 2, f"over --max-side {DEFAULT_MAX_SIDE}"),
    "nan guidance": (["--guidance", "nan"], 2, "finite"),
    "inf guidance": (["--guidance", "inf"], 2, "finite"),
    "seed too large": (["--seed", 2**63], 2, "must be 0..9223372036854775807"),
    "negative seed": (["--seed", -1], 2, "must be 0.."),
    "blank prompt": (["--prompt", " "], 2, "empty or blank"),
    "compile on cpu": (["--compile", "--device", "cpu"], 2, "GPUs"),
}


@pytest.mark.parametrize("case", BAD)
def test_mistakes_one_line_nothing_written(tmp_path, case):
    args, code, words = BAD[case]
    argv = ["txt2img", "--prompt", "car", "--steps", 1, "--output", tmp_path / "o.png", *args]
    line = one_error_line(generate(*argv), code)
    assert words in line and list(tmp_path.iterdir()) == [], line
    print(f"[{case}] exit {code}: {line}")


def test_unwritable_output_is_found_first(tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_error_line(generate("txt2img", "--prompt", "car", "--output", tmp_path / "file" / "o.png"), 2)
    assert "cannot write to --output" in line and "is a file, not a folder" in line
    if Path("/sys").is_dir() and not Path("/sys").stat().st_mode & 0o222:  # sysfs: EACCES even for root
        line = one_error_line(generate("txt2img", "--prompt", "car", "--output", "/sys/o.png"), 2)
        assert "permission denied" in line


def test_non_finite_result_stops_naming_the_step(tmp_path):
    """A NaN in the UNet's last conv: the first UNet call's output is NaN; nothing is written."""
    import torch
    from safetensors.torch import save_file
    from minidiff.plugin.fake import fake_models
    sd = fake_models([], False).sd
    torch.nn.init.constant_(sd.unet.out[-1].bias, float("nan"))
    parts = {"model.diffusion_model.": sd.unet, "first_stage_model.": sd.vae,
             "cond_stage_model.transformer.": sd.text_encoder}
    save_file({p + k: v.contiguous() for p, mod in parts.items() for k, v in mod.state_dict().items()},
              tmp_path / "sd.safetensors")
    out = tmp_path / "out"
    proc = generate("txt2img", "--prompt", "car", "--steps", 2, "--size", 64,
                    "--sd", tmp_path / "sd.safetensors", "--output", out / "o.png", fake=False)
    assert "not finite at sampling step 1" in one_error_line(proc, 3) and not out.exists()
