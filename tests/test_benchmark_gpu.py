"""Tests of tools/bench/benchmark_gpu.py on the CPU: its diffusers loop is the official one
(official_oracle.official_restore) and minidiff on the converted weights gives the same image (tiny models),
the full-size weights convert at the published sizes (on the meta device), and the whole script runs every
variant end to end and writes its record (tiny models; torch.compile on dynamo's eager backend here:
inductor's CPU code generation takes minutes, tests/test_compile.py runs it).

    python -m pytest tests/test_benchmark_gpu.py -q -s
"""
import functools
import json

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import helpers  # noqa: F401  (puts tools/ on sys.path; first)
import benchmark_gpu as bench  # imports diffusers only when called
import official_oracle as oracle
from minidiff.plugin.plugin import compiled_denoise_step, restore

pytestmark = pytest.mark.parity


@pytest.fixture(autouse=True)
def references():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")


def max_level_diff(a, b):
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_loops_match_the_official_one():
    ref = bench.reference_models(tiny=True, device="cpu")
    photo = bench.sample_photo(64)
    plugins = [("derain", ref["tpb"], ref["scb"])]
    official = oracle.official_restore(ref["unet"], ref["vae"], ref["clip"], plugins, photo, photo, steps=3)
    ours = bench.diffusers_restore(ref, photo, 3)
    # the same calls but CLIP's attention (SDPA here, the eager path under output_attentions=True):
    # measured 0 levels
    assert max_level_diff(ours, official) <= 1
    sd, clip, plugin = bench.minidiff_models(ref, torch.float32)
    # minidiff on the converted weights: the parity of tests/test_plugin.py (within one 8-bit level)
    assert max_level_diff(restore(sd, clip, [plugin], photo, steps=3, progress=False), official) <= 1


def test_script_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    compiled_denoise_step.cache_clear()
    counters.clear()
    try:
        bench.main(["--tiny", "--device", "cpu", "--sizes", "64", "--steps", "3", "--runs", "1",
                    "--dtypes", "bf16", "--batches", "1", "2", "--json", str(tmp_path / "gpu.json")])
    finally:
        torch._dynamo.reset()
        compiled_denoise_step.cache_clear()
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [*bench.VARIANTS, "minidiff batch", "minidiff batch"]
    batches, rows = rows[4:], rows[:4]
    assert [r["batch"] for r in batches] == [1, 2] and all("error" not in r for r in batches)
    assert all(r["photos_s"] > 0 and r["latency_s"] > 0 for r in batches)
    for r in rows:
        assert "error" not in r, r
        assert r["latency_s"] > 0 and r["it_s"] > 0
        assert r["max_levels_vs_fp32"] < 32  # bf16 against fp32, 3 steps of tiny random networks
    assert counters["stats"]["unique_graphs"] == 2  # one graph per library: no recompile across steps
    out = capsys.readouterr().out
    assert "bf16 64: minidiff compiled" in out and "bf16 64: minidiff eager" in out
    assert "bf16 64: batch 2" in out and "x batch 1)" in out


def test_full_size_models_convert():
    """The GPU run's full-size weights, built on the meta device (no memory): every reference tensor lands in
    minidiff's models at the published sizes (SD-1.5 UNet and VAE, ViT-L/14, the official TPB and SCB)."""
    ref = bench.reference_models(tiny=False, device="meta")
    sd, clip, plugin = bench.minidiff_models(ref, torch.float16)
    ours = {"unet": sd.unet, "vae": sd.vae, "clip": clip, "tpb": plugin.tpb, "scb": plugin.scb}
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in ours.items()}
    assert sizes == {k: sum(p.numel() for p in m.parameters()) for k, m in ref.items()}
    assert sizes == {"unet": 859_520_964, "vae": 83_653_863, "clip": 303_179_776, "tpb": 2_890_496,
                     "scb": 11_973_120}
    assert plugin.scb.cfg.heads == 8 and clip.cfg.heads == 16 and sd.unet.cfg.channel_mult == (1, 2, 4, 4)
