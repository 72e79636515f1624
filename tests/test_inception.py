"""Tests of minidiff/eval/inception.py, the FID InceptionV3.

Fast: output shape, strict loading of a pt_inception-style state dict (fc and num_batches_tracked skipped),
the padding-free average pool. Parity (oracle environment with pytorch-fid; MINIDIFF_ORACLE_PYTHON): features
of the real demo photos equal pytorch-fid's InceptionV3([3]) with the same random weights, resize included.
Run: MINIDIFF_ORACLE_PYTHON=/work/venvs/oracle/bin/python python -m pytest tests/test_inception.py -q -s
--runslow (the parity test runs the full-size network and is marked slow)
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiff.eval import inception, metrics
from minidiff.io.weights import CheckpointError
from helpers import assert_close, photo_folder, run_oracle

ORACLE = os.path.join(os.path.dirname(__file__), "oracle")
DEMO = Path(photo_folder())


def pt_inception_state_dict():
    """A state dict with the keys of pt_inception-2015-12-05-6726825d.pth (torchvision BatchNorm2d + fc)."""
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) * 0.05 for k, v in inception.FIDInception().state_dict().items()}
    for k in [k for k in sd if k.endswith("running_var")]:
        sd[k] = sd[k].abs() + 0.5
        sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return sd


def test_load_strict_and_shape(tmp_path):
    sd = pt_inception_state_dict()
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in sd and "Conv2d_1a_3x3.conv.weight" in sd
    torch.save(sd, tmp_path / "pt_inception.pth")
    model = inception.load_inception(str(tmp_path / "pt_inception.pth"))
    x = torch.rand(1, 3, 120, 90)
    x0 = x.clone()
    out = model(x)
    assert out.shape == (1, inception.FEATURE_DIM) and torch.equal(x, x0)  # input untouched
    # a pre-resized 299 input takes the same path as the resize inside forward
    assert torch.equal(model(inception.resize_299(x)), out)
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="1 missing keys"):
        inception.load_inception(str(tmp_path / "broken.pth"))


def test_avg_pool_ignores_padding():
    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(inception.avg_pool_same(x), x)  # zero padding would pull the borders below 1


def test_inception_pixels_range():
    arr = np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    x = inception.inception_pixels(arr)
    assert x.shape == (3, 299, 299) and 0 <= x.min() and x.max() <= 1


@pytest.mark.slow  # a full-size network: --runslow (CI runs it)
@pytest.mark.parity
def test_features_equal_pytorch_fid(tmp_path):
    weights = tmp_path / "pt_inception.pth"
    run_oracle(os.path.join(ORACLE, "fid_inception.py"), DEMO, weights, tmp_path / "ref.npy")
    ref = np.load(tmp_path / "ref.npy")
    extractor = metrics.load_feature_extractor("inception", str(weights))
    ours = metrics.files_features(metrics.list_images(str(DEMO)), extractor, batch_size=4, progress=False)
    assert ours.dtype == np.float32
    # 1e-4 x scale: float32 convs of two torch builds (2.13 here, 2.14 in the oracle) over 94 layers
    assert_close(ours, ref, 1e-4, "inception features (9 demo photos)")
