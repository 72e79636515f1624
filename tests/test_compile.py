"""Tests of the compiled restore path (minidiff.plugin.plugin: denoise_step, compiled_denoise_step,
restore(compile=True)) on the CPU, with tiny random models: the steps and the plugins of a restore share ONE
compiled graph (no recompile: the timestep is a tensor input, the weights are inputs), a new image size
compiles once more (static shapes), and the compiled result matches eager. tools/bench/benchmark_gpu.py measures
the GPU speed (tests/test_benchmark_gpu.py runs it on the CPU), tests/test_gpu.py checks the compiled path
on CUDA.

    python -m pytest tests/test_compile.py -q -s              (dynamo only: ~15 s)
    python -m pytest tests/test_compile.py -q -s --runslow    (+ inductor's C++ code for the CPU: ~1-2 min)
"""
import functools
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from helpers import assert_close
from minidiff.plugin.fake import fake_models
from minidiff.plugin.plugin import SCB, TINY_PLUGIN, TPB, TaskPlugin, compiled_denoise_step, denoise_step, restore
from minidiff.models.unet import TINY_UNET, UNet
from minidiff.models.vae import TINY_VAE, AutoencoderKL


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from nothing and counts its own graphs."""
    torch._dynamo.reset()
    compiled_denoise_step.cache_clear()
    counters.clear()
    yield
    torch._dynamo.reset()
    compiled_denoise_step.cache_clear()


def photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def max_level_diff(a, b):
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_one_graph_for_every_step_and_plugin(monkeypatch):
    """Dynamo with its eager backend: the same tracing, guards and recompile decisions as inductor, without
    its code generation (minutes on a CPU; the slow test below runs it). A recompile would raise."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    m = fake_models(["derain", "dehaze"], with_selector=False)
    plugins = [m.plugins["derain"], m.plugins["dehaze"]]  # the second: other SCB weights, same sizes
    image = photo(64, 48)
    kw = dict(steps=4, chain_steps=2, progress=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = restore(m.sd, m.clip_vision, plugins, image, compile=True, **kw)  # 6 steps, 2 plugins
    assert counters["stats"]["unique_graphs"] == 1
    assert max_level_diff(out, restore(m.sd, m.clip_vision, plugins, image, **kw)) == 0  # same aten ops
    restore(m.sd, m.clip_vision, plugins[:1], photo(48, 64), compile=True, **kw)  # another size: static
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_inductor_matches_eager():
    """The real compile (inductor, C++ for the CPU) of a small SCB + UNet: one graph for the whole restore,
    and within float rounding of eager. Smallest UNet the SCB fits (one level, the 3 skips it feeds) to keep
    inductor's cold compile short (measured 123 s on 2 cores shared at load 4.7; ~10 s with a warm cache)."""
    torch.manual_seed(0)
    unet = UNet(replace(TINY_UNET, channel_mult=(1,), attention_levels=(0,), heads=2)).eval()
    plugin = TaskPlugin("derain", TPB(TINY_PLUGIN), SCB(TINY_PLUGIN)).eval()
    for conv in plugin.scb.zero_convs:  # non-zero residuals, so that the SCB matters
        torch.nn.init.normal_(conv.weight, std=0.05)
    sd = type("SD", (), {"unet": unet, "vae": AutoencoderKL(replace(TINY_VAE, ch_mult=(1, 1, 1, 1))).eval()})
    feats = torch.randn(1, 256, TINY_PLUGIN.clip_dim)
    image = photo(64, 64)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():  # grad mode is guarded too
        out = restore(sd, None, [plugin], image, steps=4, progress=False, features=feats, compile=True)
        x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        ctx = plugin.tpb(feats)
        for t in (999, 1):
            t = torch.tensor(t)
            eps = compiled_denoise_step("cpu")(unet, plugin.scb, x, t, cond, ctx)
            # inductor fuses and reorders fp32 reductions (GroupNorm, softmax, conv epilogues): measured
            # max|diff| 1.1e-6 at max|eps| 1.0 (8.6e-7 at t=1); 1e-5 leaves 9x
            assert_close(eps, denoise_step(unet, plugin.scb, x, t, cond, ctx), 1e-5, f"compiled eps t={t}")
    assert counters["stats"]["unique_graphs"] == 1
    eager = restore(sd, None, [plugin], image, steps=4, progress=False, features=feats)
    # 1e-6 differences through 4 UniPC steps and the VAE stay far below one level of 8-bit output; a pixel
    # sitting on a rounding boundary can still flip by one level: measured max 1 level
    print(f"compiled vs eager restore: {max_level_diff(out, eager)} levels")
    assert max_level_diff(out, eager) <= 1
