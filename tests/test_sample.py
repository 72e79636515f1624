"""tools/sample.py as a user runs it (a subprocess), with --fake-weights: random tiny models, no files.

Covers the outputs and JSON record, one seed for every photo of a folder, --dry-run, a prompt that matches
no plugin (the photo back, resized as demo.py returns it: untouched at 512x512), user mistakes (one line on
stderr, no traceback, nothing written, inputs intact), the missing-weights message, and the loading path (the
same tiny models written as files, run without --fake-weights). txt2img / img2img: tests/test_generate.py;
issue 10's rough edges: tests/test_sample_edges.py. About a minute on 2 CPU cores:
    python -m pytest tests/test_sample.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "sample.py"


def sample(*args, fake=True):
    cmd = [sys.executable, str(SCRIPT), *(["--fake-weights"] if fake else []), "--no-progress",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def photo(path, size=(24, 16), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Two identical tiny photos under different names (+ a non-image file), --task deblur, 2 steps, and a
    --max-side small enough to cap the size (the official rule would give 768x512): a quick test."""
    src = tmp_path_factory.mktemp("in")
    photo(src / "a.png")
    photo(src / "b.png")
    (src / "notes.txt").write_text("not a photo\n")
    out = tmp_path_factory.mktemp("out")
    proc = sample("--input", src, "--task", "deblur", "--steps", 2, "--max-side", 256, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return src, out, proc


def test_outputs_and_record(folder_run):
    src, out, proc = folder_run
    assert sorted(p.name for p in out.iterdir()) == ["a-compare.png", "a.json", "a.png",
                                                     "b-compare.png", "b.json", "b.png"]
    assert "FAKE WEIGHTS" in proc.stdout
    rec = json.loads((out / "a.json").read_text())
    assert rec["tasks"] == ["deblur"] and rec["scores"] is None and rec["prompt"] is None
    assert rec["fake_weights"] is True and "FAKE WEIGHTS" in rec["warning"]
    assert (rec["seed"], rec["steps"], rec["chain_steps"]) == (42, 2, 3)
    assert rec["input_size"] == [24, 16] and rec["processed_size"] == [256, 168]  # 24x16 x 10.7, floor 8
    assert "capped" in rec["resize"] and "768x512" in rec["resize"] and rec["max_side"] == 256
    assert rec["outputs"] == {"result": "a.png", "compare": "a-compare.png"} and rec["dry_run"] is False
    assert set(rec["timings_s"]) == {"select", "preprocess", "restore"} and rec["checkpoints"] == {}
    assert rec["minidiff_version"] and rec["mode"] == "plugin" and rec["input"] == str(src / "a.png")
    assert Image.open(out / "a.png").size == (256, 168)
    assert Image.open(out / "a-compare.png").size == (512, 168)
    assert (pixels(src / "a.png") == pixels(src / "b.png")).all()  # inputs untouched


def test_same_seed_for_every_photo(folder_run):
    _, out, _ = folder_run
    a, b = pixels(out / "a.png"), pixels(out / "b.png")
    assert (a == b).all(), "two identical photos of one folder gave different results: seed not per photo"


def test_dry_run_writes_only_the_record(tmp_path):
    src = photo(tmp_path / "rainy.jpg", size=(40, 30))
    out = tmp_path / "out"
    proc = sample("--input", src, "--prompt", "please remove the rain", "--dry-run", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["rainy.json"]
    rec = json.loads((out / "rainy.json").read_text())
    tasks = ["derain", "desnow", "lowlight", "dehaze", "deblur", "highlight", "face", "demoire"]
    assert list(rec["scores"]) == tasks + ["null"]  # raw scores, every plugin and the null entry
    assert all(isinstance(v, float) for v in rec["scores"].values())
    assert isinstance(rec["tasks"], list) and set(rec["tasks"]) <= set(tasks)
    assert rec["dry_run"] is True and rec["outputs"] is None and rec["threshold"] == 0.0
    assert rec["processed_size"] == [680, 512]  # int(512 / 30 * 40) = 682, floored to a multiple of 8
    assert "official rule" in rec["resize"]
    assert "restore" not in rec["timings_s"]


def test_no_match_gives_the_photo_back_untouched(tmp_path):
    src = photo(tmp_path / "x.png", size=(512, 512), seed=3)  # already the demo rule's size
    out = tmp_path / "out"
    proc = sample("--input", src, "--prompt", "make it nice", "--threshold", 1e9, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "x.json").read_text())
    assert rec["tasks"] == [] and "untouched" in rec["resize"] and "null" in rec["scores"]
    assert (pixels(out / "x.png") == pixels(src)).all()
    assert (out / "x-compare.png").exists()


def _bad_inputs(tmp):
    good = photo(tmp / "good.png")
    trunc = tmp / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:200])
    text = tmp / "text.png"
    text.write_text("hello\n")
    out = tmp / "out"
    return {
        "blank prompt": ["--input", good, "--prompt", "  \t ", "--output", out],
        "empty prompt": ["--input", good, "--prompt", "", "--output", out],
        "truncated image": ["--input", trunc, "--task", "derain", "--output", out],
        "text as image": ["--input", text, "--task", "derain", "--output", out],
        "unknown task": ["--input", good, "--task", "derain", "unblur", "--output", out],
        "output is input folder": ["--input", good, "--task", "derain", "--output", tmp],
        "prompt and task": ["--input", good, "--prompt", "rain", "--task", "derain", "--output", out],
        "no instruction": ["--input", good, "--output", out],
    }


@pytest.mark.parametrize("case", ["blank prompt", "empty prompt", "truncated image", "text as image",
                                  "unknown task", "output is input folder", "prompt and task",
                                  "no instruction"])
def test_user_mistakes_one_line_nothing_written(tmp_path, case):
    args = _bad_inputs(tmp_path)[case]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = sample(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    # a flag's value refused by the parser: "sample.py: error: argument ...", exit 2 (README "Exit status");
    # a refusal after parsing: "error: ..."
    start = "sample.py: error: argument --prompt" if case in ("blank prompt", "empty prompt") else "error: "
    assert len(lines) == 1 and lines[0].startswith(start), proc.stderr
    assert proc.returncode == 2 or not start.startswith("sample.py"), proc.returncode
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, inputs intact
    print(f"[{case}] {lines[0]}")


def test_missing_weights_lists_the_files(tmp_path):
    src = photo(tmp_path / "p.png")
    proc = sample("--input", src, "--task", "derain", "--sd", tmp_path / "sd.safetensors",
                  "--clip", tmp_path / "clip", "--plugins", tmp_path / "plugins", "--output", tmp_path / "o",
                  fake=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "sd.safetensors" in proc.stderr and "derain" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_real_loading_path_and_hashes(tmp_path):
    """The tiny random models as files (SD single file, HF CLIP vision, minidiff plugins and selector),
    run WITHOUT --fake-weights: loaders, selection, hashes in the record."""
    import hashlib
    from safetensors.torch import save_file

    from minidiff.plugin.fake import fake_models
    from minidiff.plugin.files import save_plugin, save_selector
    m = fake_models(["derain", "deblur"])
    parts = {"model.diffusion_model.": m.sd.unet, "first_stage_model.": m.sd.vae,
             "cond_stage_model.transformer.": m.sd.text_encoder}
    save_file({p + k: v.contiguous() for p, mod in parts.items() for k, v in mod.state_dict().items()},
              tmp_path / "sd.safetensors")
    save_file({k: v.contiguous() for k, v in m.clip_vision.state_dict().items()},
              tmp_path / "clip.safetensors")
    (tmp_path / "plugins").mkdir()
    for task, plugin in m.plugins.items():
        save_plugin(plugin, tmp_path / "plugins" / f"{task}.safetensors")
    save_selector(m.selector, tmp_path / "selector.safetensors")
    src = photo(tmp_path / "p.png")
    files = ["--sd", tmp_path / "sd.safetensors", "--clip", tmp_path / "clip.safetensors",
             "--plugins", tmp_path / "plugins", "--selector", tmp_path / "selector.safetensors"]
    proc = sample("--input", src, "--prompt", "remove the rain", "--dry-run", "--output", tmp_path / "a",
                  *files, fake=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "a" / "p.json").read_text())
    assert list(rec["scores"]) == ["derain", "deblur", "null"] and rec["fake_weights"] is False
    proc = sample("--input", src, "--task", "deblur", "--steps", 1, "--max-side", 128,
                  "--output", tmp_path / "b", *files, fake=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "b" / "p.json").read_text())
    want = hashlib.sha256((tmp_path / "sd.safetensors").read_bytes()).hexdigest()
    assert rec["checkpoints"]["sd"]["sha256"] == want
    assert set(rec["checkpoints"]) == {"sd", "clip", "plugin:deblur"}
    assert Image.open(tmp_path / "b" / "p.png").size == tuple(rec["processed_size"]) == (128, 80)
