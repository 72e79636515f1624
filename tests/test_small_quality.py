"""The shipped small family's restoration quality (issue 18) holds the figures measured for the README, on
held-out photos that no stage trained on: a regression guard for the whole restore path of the small family
(its files, the latent scale, the CLIP input size, the plugin loop), not a proof of the issue's targets,
which the README reports as met or missed. tests/data/heldout: 6 public-domain / CC0 photos (128 x 128 centre crops; see its README.md), each
degraded by minidiff.train.degrade with seed (0, index) and restored with its task's plugin, 20 UniPC steps,
noise seed 0 (tools/bench/small_quality.py, the script behind the README's table, measures the same way).
"""
import os
from pathlib import Path

import pytest
import torch

import helpers  # noqa: F401  (tools/ and tools/bench/ on sys.path)
import small_quality
from minidiff.io.imageio import list_images, load_image

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "checkpoints" / "small"
PHOTOS = ROOT / "tests" / "data" / "heldout"
# Output PSNR (dB) against the clean photo, measured on these 6 photos with the shipped family (README "Train
# the whole stack on a laptop"; python tools/bench/small_quality.py --photos tests/data/heldout --output Q), and
# the floor asserted: the measured value minus SLACK_DB, so that a change of the restore path that costs
# quality fails, while last-bit differences between machines (other oneDNN kernels) do not.
MEASURED_OUTPUT_PSNR_DB = {"lowlight": 13.30, "dehaze": 13.93, "derain": 15.39, "desnow": 15.10,
                           "highlight": 13.11, "deblur": 15.35}
SLACK_DB = 0.5


@pytest.fixture(scope="module")
def quality():
    if not (FAMILY / "manifest.json").is_file():
        pytest.skip("checkpoints/small is not shipped in this checkout")
    torch.manual_seed(0)
    photos = [small_quality.clean_square(load_image(p), 128) for p in list_images(str(PHOTOS))]
    models = small_quality.load_small(str(FAMILY))
    table, _ = small_quality.measure(models, photos, list(MEASURED_OUTPUT_PSNR_DB), steps=20, seed=0)
    return table


@pytest.mark.parametrize("task", sorted(MEASURED_OUTPUT_PSNR_DB))
def test_small_family_holds_its_measured_quality(quality, task):
    m = quality[task]
    print(f"{task}: PSNR {m['input_psnr']:.2f} -> {m['output_psnr']:.2f} dB, "
          f"SSIM {m['input_ssim']:.3f} -> {m['output_ssim']:.3f}")
    assert m["output_psnr"] >= MEASURED_OUTPUT_PSNR_DB[task] - SLACK_DB
