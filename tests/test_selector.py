"""Tests of minidiff.plugin.selector: the selection rule (threshold, null entry, official order, composite table)
and parity of the scores with the official formula on transformers' CLIPTextModel / CLIPVisionModel
(official_oracle.py). The selector files are tested in test_plugin_files.py.

    python -m pytest tests/test_selector.py -q -s          (about 15 s)
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_close
from minidiff.plugin import selector as sel
from minidiff.plugin.files import load_plugin, load_selector


def fake_scores(monkeypatch, values):
    monkeypatch.setattr(sel, "scores", lambda *a: dict(values))
    return [SimpleNamespace(task=t) for t in values if t != sel.NULL]


def test_selection_rule(monkeypatch):
    # scores above theta = 0 run, in the official order (not by score); negatives are kept in the record
    plugins = fake_scores(monkeypatch, {"dehaze": 3.0, "derain": 0.5, "face": -2.0, "null": 1.0})
    tasks, scores = sel.select(None, None, None, plugins, None, "remove the rain and haze")
    assert tasks == ["derain", "dehaze"] and scores["face"] == -2.0 and scores["null"] == 1.0
    tasks, _ = sel.select(None, None, None, plugins, None, "remove the rain and haze", threshold=1.0)
    assert tasks == ["dehaze"]
    # nothing positive: the null entry wins, nothing to do
    plugins = fake_scores(monkeypatch, {"derain": -0.1, "dehaze": 0.0, "null": -3.0})
    assert sel.select(None, None, None, plugins, None, "make it pretty")[0] == []
    with pytest.raises(ValueError):
        sel.select(None, None, None, plugins, None, "   ")


def test_composite_table(monkeypatch):
    plugins = fake_scores(monkeypatch, {"derain": -1.0, "dehaze": -1.0, "lowlight": -1.0, "null": 2.0})
    tasks, _ = sel.select(None, None, None, plugins, None, "Fix this photo taken in a STORM")
    assert tasks == ["derain", "dehaze"]
    # restricted to the available plugins; word boundaries (no "storm" inside "brainstorming")
    assert sel.composite_tasks("a blizzard", ["derain", "dehaze"]) == (["dehaze"], [sel.COMPOSITE[1][0]])
    assert sel.composite_tasks("brainstorming session", ["derain", "dehaze"])[0] == []
    for pattern, tasks, why in sel.COMPOSITE:
        assert tasks and why and all(t in sel.TASKS for t in tasks), pattern


def test_scores_formula():
    # exp(logit_scale) x cosine of the heads' outputs; the null row is the visual head on the " " embedding
    torch.manual_seed(0)
    model = sel.PluginSelector(8)
    v, q = torch.randn(3, 8), torch.randn(1, 8)
    a, b = model.proj_v(v), model.proj_t(q)
    expect = torch.cosine_similarity(a, b, dim=-1) / 0.07
    assert_close(model(v, q), expect, 1e-5, "selector formula")


# --------------------------------------------------------------------------------------------------------
# Parity with the official scores (demo.py l.85-160) on tiny random models in the official file layouts


@pytest.mark.parity
def test_scores_match_official(tmp_path):
    pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    import official_oracle as oracle
    from test_tokenizer import _reference_tokenizer
    from minidiff.io.loading import build_clip_text, load_clip_vision
    from minidiff.io.weights import read_state_dict
    from minidiff.models.tokenizer import CLIPTokenizer
    _, _, text, clip = oracle.make_sd_and_clip(str(tmp_path))
    tasks = ["derain", "lowlight", "dehaze", "face"]
    tpbs = [oracle.make_plugin(str(tmp_path / "pre-trained" / t), 20 + i)[0] for i, t in enumerate(tasks)]
    torch.manual_seed(5)
    ref = oracle.RefSelector().eval()
    sd_file = {"model": {"module." + k: v for k, v in ref.state_dict().items()}}
    torch.save(sd_file, tmp_path / "PromptTunner.pt")
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((160, 120), Image.BICUBIC)
    ref_tok = _reference_tokenizer(tmp_path)
    sd = SimpleNamespace(tokenizer=CLIPTokenizer(), text_encoder=build_clip_text(
        read_state_dict(str(tmp_path / "sd" / "text_encoder" / "model.safetensors"))))
    clip_vision = load_clip_vision(str(tmp_path / "clip"))
    plugins = [load_plugin(tmp_path / "pre-trained" / t) for t in tasks]
    selector = load_selector(tmp_path / "PromptTunner.pt")
    for prompt in ["please remove the rain", "Make it brighter!", "restore the face, it's blurry"]:
        expect = oracle.official_scores(ref, text, ref_tok, clip, tpbs, photo, prompt)
        tasks_, scores = sel.select(selector, sd, clip_vision, plugins, photo, prompt)
        got = torch.tensor([scores[t] for t in tasks + ["null"]])
        # fp32, same maths in another order (F.normalize vs x / |x|): float rounding only; scores are ~1-14
        assert_close(got, expect, 1e-4, f"scores {prompt!r}")
        assert tasks_ == [t for t in tasks if expect[tasks.index(t)] > 0]
    assert transformers.__version__.startswith("4.")
