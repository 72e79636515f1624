"""Tests of tools/convert.py: official <-> minidiff plugin and selector files, bit-exact both ways, batch
conversion of a pre-trained/ folder, one-line errors; and (parity) that exported files load strictly into the
official module structure rebuilt from diffusers (tests/official_oracle.py).

    python -m pytest tests/test_convert.py -q -s           (a few seconds)
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import helpers  # noqa: F401  (puts tools/ on sys.path: official_oracle)

from minidiff.plugin.plugin import TINY_PLUGIN, SCB, TPB, TaskPlugin
from minidiff.plugin.files import (export_official_plugin, find_plugins, load_plugin, load_selector,
                                   save_plugin)
from minidiff.plugin.selector import PluginSelector
from minidiff.io.weights import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("convert_tool", os.path.join(ROOT, "tools", "convert.py"))
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)


def tiny_plugin(task, seed):
    torch.manual_seed(seed)
    plugin = TaskPlugin(task, TPB(TINY_PLUGIN), SCB(TINY_PLUGIN))
    for p in plugin.parameters():  # every tensor random, zero convs included, so nothing matches by accident
        torch.nn.init.normal_(p, std=0.1)
    return plugin.eval()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_plugin_round_trips_bit_exact(tmp_path):
    plugin = tiny_plugin("derain", 0)
    save_plugin(plugin, tmp_path / "derain.safetensors", {"base_model": "sd-1.5", "steps_trained": 7})
    assert convert.main([str(tmp_path / "derain.safetensors"), str(tmp_path / "official" / "derain")]) == 0
    folder = tmp_path / "official" / "derain"
    assert sorted(os.listdir(folder)) == ["scb", "tpb.pt"]
    cfg = json.loads((folder / "scb" / "config.json").read_text())
    assert cfg["block_out_channels"] == [32] and cfg["attention_head_dim"] == 2
    assert cfg["cross_attention_dim"] == 32 and cfg["down_block_types"] == ["CrossAttnDownBlock2D"]
    scb = torch.load(folder / "scb" / "diffusion_pytorch_model.bin", weights_only=True)
    assert len(scb) == 84 and "controlnet_down_blocks.2.weight" in scb  # the official key set
    assert set(torch.load(folder / "tpb.pt", weights_only=True)) == {"model"}
    # and back: official -> minidiff gives the same tensors
    assert convert.main([str(folder), str(tmp_path / "back.safetensors"), "--steps-trained", "7"]) == 0
    back = load_plugin(tmp_path / "back.safetensors")
    assert back.task == "derain" and back.metadata["steps_trained"] == "7"
    assert same(plugin.state_dict(), back.state_dict())
    assert same(plugin.state_dict(), load_plugin(folder).state_dict())


def test_pre_trained_folder_and_selector(tmp_path):
    pre = tmp_path / "pre-trained"
    for i, task in enumerate(["dehaze", "derain"]):
        export_official_plugin(tiny_plugin(task, i), str(pre / task))
    torch.manual_seed(3)
    sel = PluginSelector(32)
    (pre / "plugin_selector").mkdir()
    torch.save({"model": {"module." + k: v for k, v in sel.state_dict().items()}}, pre / "plugin_selector" /
               "PromptTunner.pt")
    assert convert.main([str(pre), str(tmp_path / "plugins")]) == 0
    assert sorted(os.listdir(tmp_path / "plugins")) == ["dehaze.safetensors", "derain.safetensors",
                                                         "selector.safetensors"]
    assert list(find_plugins(tmp_path / "plugins")) == ["derain", "dehaze"]  # official order, no selector
    assert same(load_plugin(tmp_path / "plugins" / "derain.safetensors").state_dict(),
                tiny_plugin("derain", 1).state_dict())
    out = tmp_path / "PromptTunner.pt"
    assert convert.main([str(tmp_path / "plugins" / "selector.safetensors"), str(out)]) == 0
    assert same(torch.load(out, weights_only=True)["model"], sel.state_dict())
    assert same(load_selector(out).state_dict(), sel.state_dict())


def test_errors_are_one_line(tmp_path, capsys):
    def run(*args):
        rc = convert.main([str(a) for a in args])
        return rc, capsys.readouterr().err.strip()
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    rc, err = run(tmp_path / "junk.pt", tmp_path / "y.safetensors")
    assert rc == 1 and err.startswith("convert: ") and "\n" not in err and "junk.pt" in err
    save_plugin(tiny_plugin("face", 0), tmp_path / "face.safetensors")
    (tmp_path / "taken").mkdir()
    rc, err = run(tmp_path / "face.safetensors", tmp_path / "taken")
    assert rc == 1 and "exists" in err and "\n" not in err
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # nothing half-written left behind
    # as a script: exit status 1, one line, no traceback
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), str(tmp_path / "missing"),
                        str(tmp_path / "x.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and p.stderr.strip().startswith("convert: ") and "\n" not in p.stderr.strip()
    assert "missing" in p.stderr


def test_torch_errors_end_on_whole_words(tmp_path):
    """torch.load's refusals used to be cut at 160 characters, mid-word: now the telling sentence, whole."""
    import argparse
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    torch.save({"model": {"a": torch.zeros(1)}, "x": argparse.Namespace()}, tmp_path / "pickle.pt")
    for name, end in (("zip.pt", "failed finding central directory)"),
                      ("pickle.pt", "GLOBAL argparse.Namespace was not an allowed global by default)")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), str(tmp_path / name),
                            str(tmp_path / "o.safetensors")], capture_output=True, text=True, cwd=ROOT)
        line = p.stderr.strip()
        assert p.returncode == 1 and "\n" not in line and line.endswith(end), line


@pytest.mark.parity
def test_exported_files_load_into_official_modules(tmp_path):
    pytest.importorskip("diffusers")
    import official_oracle as oracle
    plugin = tiny_plugin("derain", 0)
    export_official_plugin(plugin, str(tmp_path / "derain"))
    cfg = json.loads((tmp_path / "derain" / "scb" / "config.json").read_text())
    width, heads, ctx = cfg["block_out_channels"][0], cfg["attention_head_dim"], cfg["cross_attention_dim"]
    ref_scb = oracle.RefSCB(width, heads, ctx)
    scb_file = tmp_path / "derain" / "scb" / "diffusion_pytorch_model.bin"
    ref_scb.load_state_dict(torch.load(scb_file, weights_only=True), strict=True)
    ref_tpb = oracle.RefTPB()
    tpb_file = tmp_path / "derain" / "tpb.pt"
    ref_tpb.load_state_dict(torch.load(tpb_file, weights_only=True)["model"], strict=True)
    torch.manual_seed(1)
    feats, cond = torch.randn(1, 257, TINY_PLUGIN.clip_dim), torch.randn(1, 4, 5, 7)
    with torch.no_grad():
        tokens = ref_tpb([None] * 24 + [feats])
        assert torch.allclose(plugin.tpb(feats[:, 1:]), tokens, atol=1e-6)
        ref = ref_scb(cond, torch.tensor(500), tokens, cond)
        ours = plugin.scb(cond, 500, tokens)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, ref[:3]))  # fp32 rounding only


def test_official_folder_with_safetensors_weights(tmp_path):
    # diffusers can also save the SCB as diffusion_pytorch_model.safetensors: read it the same way
    from safetensors.torch import save_file
    plugin = tiny_plugin("deblur", 4)
    export_official_plugin(plugin, str(tmp_path / "deblur"))
    scb = tmp_path / "deblur" / "scb"
    save_file(torch.load(scb / "diffusion_pytorch_model.bin", weights_only=True),
              scb / "diffusion_pytorch_model.safetensors")
    (scb / "diffusion_pytorch_model.bin").unlink()
    assert same(load_plugin(tmp_path / "deblur").state_dict(), plugin.state_dict())
    (tmp_path / "deblur" / "tpb.pt").unlink()
    with pytest.raises(CheckpointError, match="tpb.pt"):
        load_plugin(tmp_path / "deblur")
