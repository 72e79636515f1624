"""The shipped small family's restoration quality (issue 18) holds the figures measured for the README, on
held-out photos that no stage trained on: a regression guard for the whole restore path of the small family
(its files, the latent scale, the CLIP input size, the plugin loop), not a proof of the issue's targets,
which the README reports as met or missed. tests/data/heldout: 6 public-domain / CC0 photos (128 x 128 centre
crops; see its README.md), each degraded by minidiff.train.degrade with seed (0, index) and restored with its
task's plugin, 20 UniPC steps, noise seed 0 (tools/bench/small_quality.py, the script behind the README's
table, measures the same way). And the shipped selector's held-out accuracy (the last test).
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
MEASURED_OUTPUT_PSNR_DB = {"lowlight": 13.12, "dehaze": 14.14, "derain": 15.91, "desnow": 15.55,
                           "highlight": 13.21, "deblur": 15.80}
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


# The shipped selector on the corpus' held-out instructions, each paired with one of these 6 photos degraded
# for one of its tasks (tools/eval_selector.py; README's selector table measures the same on 18 photos):
# single-task ZTA measured on these photos, and the floor asserted (one request in ~30 may change).
MEASURED_SINGLE_TASK_ZTA = 0.817  # (the selector trained with infonce, shipped before: 0.648)
ZTA_SLACK = 0.03


def test_small_selector_holds_its_measured_accuracy(tmp_path):
    if not (FAMILY / "manifest.json").is_file():
        pytest.skip("checkpoints/small is not shipped in this checkout")
    import json

    import eval_selector
    from minidiff.plugin.plugin import TASKS
    from minidiff.train.degrade import degrade
    photos = [small_quality.clean_square(load_image(p), 128) for p in list_images(str(PHOTOS))]
    for task in TASKS:
        (tmp_path / "images" / task).mkdir(parents=True)
        for k, photo in enumerate(photos):
            degrade(task, photo, (0, k)).save(tmp_path / "images" / task / f"{k}.png")
    code = eval_selector.main(["--model", "small", "--selector", str(FAMILY / "selector.safetensors"),
                               "--images", str(tmp_path / "images"), "--json", str(tmp_path / "eval.json")])
    assert code in (0, None)
    zta = json.loads((tmp_path / "eval.json").read_text())["settings"]["single-task"]["ZTA"]
    print(f"single-task ZTA {zta:.3f}")
    assert zta >= MEASURED_SINGLE_TASK_ZTA - ZTA_SLACK
