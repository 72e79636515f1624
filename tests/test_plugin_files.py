"""Tests of minidiff.plugin.files: the Task-Plugin and Plugin-Selector files, minidiff's one-file format and
the official layouts (scb/ + tpb.pt, PromptTunner.pt with `module.` prefixes): round trips, the plugin-folder
scan, and (parity) that a plugin written in the official layout loads into modules that compute what the
official TPBNet / SCBNet rebuilt from diffusers compute (official_oracle.py). tools/convert.py, which writes
these files, is tested in test_convert.py.

    python -m pytest tests/test_plugin_files.py -q -s      (a few seconds)
"""
import math

import pytest
import torch

from helpers import assert_close
from minidiff.plugin import selector as sel
from minidiff.plugin.plugin import TASKS, TINY_PLUGIN, SCB, TPB, TaskPlugin
from minidiff.plugin.files import find_plugins, load_plugin, load_selector, save_plugin, save_selector
from minidiff.io.weights import CheckpointError


def tiny_plugin(task="derain", seed=0):
    torch.manual_seed(seed)
    return TaskPlugin(task, TPB(TINY_PLUGIN), SCB(TINY_PLUGIN)).eval()


def test_minidiff_file_round_trip_and_find(tmp_path):
    plugin = tiny_plugin("dehaze")
    save_plugin(plugin, tmp_path / "dehaze.safetensors", {"base_model": "sd-1.5", "steps_trained": 10})
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.safetensors").write_bytes(b"\0" * 16)  # neither it nor a selector file is a plugin
    back = load_plugin(tmp_path / "dehaze.safetensors")
    assert back.task == "dehaze" and back.metadata["steps_trained"] == "10"
    for (k, a), (_, b) in zip(plugin.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert find_plugins(tmp_path) == {"dehaze": str(tmp_path / "dehaze.safetensors")}
    assert TASKS == ("derain", "desnow", "lowlight", "dehaze", "deblur", "highlight", "face", "demoire")


def test_selector_files(tmp_path):
    torch.manual_seed(0)
    model = sel.PluginSelector(16)
    state_dict = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state_dict}, tmp_path / "PromptTunner.pt")
    back = load_selector(tmp_path / "PromptTunner.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert math.isclose(back.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    save_selector(back, str(tmp_path / "selector.safetensors"))
    again = load_selector(tmp_path / "selector.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        load_selector(tmp_path / "bad.pt")


# --------------------------------------------------------------------------------------------------------
# Parity: official-layout files against the official modules (diffusers 0.35.2, tiny and released sizes)


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import official_oracle
    return official_oracle


@pytest.mark.parity
@pytest.mark.parametrize("full", [False, True], ids=["tiny", "released-size"])
def test_loaded_plugin_matches_official_modules(oracle, tmp_path, full):
    # released sizes: 320 channels, config attention_head_dim 8 = 8 heads of 40 (diffusers 0.17 semantics)
    tpb, scb = oracle.make_plugin(str(tmp_path / "derain"), seed=7, module_prefix=True, full=full)
    plugin = load_plugin(tmp_path / "derain")
    torch.manual_seed(3)
    feats = torch.randn(1, 257, plugin.tpb.cfg.clip_dim)
    cond, x = torch.randn(1, 4, 6, 5), torch.randn(1, 4, 6, 5)
    with torch.no_grad():
        tokens = tpb([None] * 24 + [feats])
        assert_close(plugin.tpb(feats[:, 1:]), tokens, 1e-5, "TPB")
        ref = scb(x, torch.tensor(999), tokens, cond)
        ours = plugin.scb(cond, 999, tokens)
    for i in range(3):
        assert_close(ours[i], ref[i], 1e-5, f"SCB residual {i}")  # fp32, float rounding only
