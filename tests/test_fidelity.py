"""PSNR and SSIM (minidiff.eval.metrics) against scikit-image, and tools/evaluate.py's paired scoring.

scikit-image is a test-only reference (the `test` extra): peak_signal_noise_ratio, and structural_similarity
with gaussian_weights=True, sigma=1.5, use_sample_covariance=False (Wang et al. 2004), to 1e-6.
The tool: pairing by name, results without ground truth (one line, the rest scored), a result of another size
(bicubic-resized to the ground truth, or refused), an empty set, an unreadable file, identical images.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minidiff.eval import metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import _cli  # noqa: E402
import evaluate  # noqa: E402

skm = pytest.importorskip("skimage.metrics")
GAUSS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def pair(seed=0, shape=(37, 53, 3), noise=40):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b


def y_of(img):
    """BT.601 Y [16, 235] of uint8 RGB, written independently of metrics.rgb_to_y."""
    x = img.astype(np.float64) / 255
    return 16 + x @ np.array([65.481, 128.553, 24.966])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rgb_equals_skimage(seed):
    a, b = pair(seed)
    assert metrics.psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(b, a, data_range=255), abs=1e-6)
    want = skm.structural_similarity(a, b, channel_axis=2, data_range=255, **GAUSS)
    assert abs(metrics.ssim(a, b) - want) < 1e-6 and 0.1 < want < 0.99  # a real, non-trivial value
    # floats in [0, 1]: data range 1.0, the same numbers
    af, bf = a / 255.0, b / 255.0
    assert abs(metrics.ssim(af, bf) - skm.structural_similarity(af, bf, channel_axis=2, data_range=1.0,
                                                                 **GAUSS)) < 1e-6
    assert metrics.psnr(af, bf) == pytest.approx(skm.peak_signal_noise_ratio(af, bf, data_range=1.0), abs=1e-6)


def test_y_channel_border_and_grey_equal_skimage():
    a, b = pair(3, (41, 29, 3), noise=25)
    ya, yb = y_of(a), y_of(b)
    assert ya.min() >= 16 and ya.max() <= 235
    for crop in (0, 4):
        c = slice(crop, -crop or None)
        ra, rb = ya[c, c], yb[c, c]
        assert abs(metrics.ssim(a, b, crop, y_channel=True) -
                   skm.structural_similarity(ra, rb, data_range=255, **GAUSS)) < 1e-6
        assert metrics.psnr(a, b, crop, y_channel=True) == pytest.approx(
            skm.peak_signal_noise_ratio(ra, rb, data_range=255), abs=1e-6)
        assert metrics.psnr(a, b, crop) == pytest.approx(
            skm.peak_signal_noise_ratio(a[c, c], b[c, c], data_range=255), abs=1e-6)
    g1, g2 = a[..., 0], b[..., 0]  # grey [H, W]
    assert abs(metrics.ssim(g1, g2) - skm.structural_similarity(g1, g2, data_range=255, **GAUSS)) < 1e-6


def test_edges():
    a, b = pair()
    assert metrics.psnr(a, a) == math.inf and metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(metrics.MetricsError, match="one shape"):
        metrics.psnr(a, b[:-1])
    with pytest.raises(metrics.MetricsError, match="at least 11x11"):
        metrics.ssim(a[:10], b[:10])
    with pytest.raises(metrics.MetricsError, match=r"\[0, 1\]"):
        metrics.ssim(a * 2.0, b * 2.0)


def save(folder, name, arr):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)


def run(argv, capsys):
    """evaluate.py as its __main__ runs it: under _cli.run, which turns errors into exit statuses."""
    rc = _cli.run(evaluate.main, [*map(str, argv), "--no-progress"])
    return rc, capsys.readouterr()


def test_tool_pairs_by_name_scores_and_reports(tmp_path, capsys):
    r, g = tmp_path / "out", tmp_path / "gt"
    arrays = {f"p{i}": pair(i, (30, 40, 3)) for i in range(3)}
    for k, (a, b) in arrays.items():
        save(r, f"{k}.png", b)
        save(g, f"{k}.png" if k != "p1" else f"{k}.bmp", a)  # pairs by the name without extension
    save(r, "extra.png", arrays["p0"][0])  # no ground truth: listed, the rest scored
    big = np.asarray(Image.fromarray(arrays["p2"][1]).resize((80, 60), Image.BICUBIC))
    save(r, "p2.png", big)  # another size: resized back to the ground truth's with PIL bicubic
    rc, out = run(["--restored", r, "--gt", g, "--task", "derain", "--json", tmp_path / "s.json"], capsys)
    assert rc == 0, out.err
    assert out.err.strip() == "warning: 1 of 4 results have no ground truth, not scored: extra"
    assert out.out.count("derain: 3 photos (1 resized to their ground truth (bicubic); 1 without") == 1
    t = json.loads((tmp_path / "s.json").read_text())["paired"]
    assert t["n"] == 3 and t["missing_gt"] == ["extra"] and t["resized"] == ["p2"]
    p2 = np.asarray(Image.fromarray(big).resize((40, 30), Image.BICUBIC))
    want = {"p0": arrays["p0"][1], "p1": arrays["p1"][1], "p2": p2}
    for k, res in want.items():
        gt = arrays[k][0]
        rec = t["per_photo"][k]
        assert rec["psnr_rgb"] == pytest.approx(skm.peak_signal_noise_ratio(gt, res, data_range=255), abs=1e-6)
        assert abs(rec["ssim_rgb"] - skm.structural_similarity(res, gt, channel_axis=2, data_range=255,
                                                               **GAUSS)) < 1e-6
        assert abs(rec["ssim_y"] - skm.structural_similarity(y_of(res), y_of(gt), data_range=255, **GAUSS)) < 1e-6
    assert t["per_photo"]["p2"]["resized_from"] == [80, 60]
    assert t["psnr_y"] == pytest.approx(np.mean([p["psnr_y"] for p in t["per_photo"].values()]))
    # refuse instead of resizing: one line, nothing written
    rc, out = run(["--restored", r, "--gt", g, "--size-mismatch", "refuse", "--json", tmp_path / "x.json"],
                  capsys)
    # evaluate.py's status for bad data: 1, or 2 where tools/_cli.py's unified table has reached it
    assert rc in (1, 2) and out.err.splitlines()[-1].startswith("error: ") and "80x60" in out.err
    assert not (tmp_path / "x.json").exists()


def test_tool_identical_listing_and_bad_input(tmp_path, capsys):
    a, _ = pair(0, (30, 40, 3))
    save(tmp_path / "out", "x.png", a)
    save(tmp_path / "data" / "gt", "x.png", a)
    (tmp_path / "data" / "pairs.csv").write_text("name,input,gt\nx,input/x.png,gt/x.png\n")
    rc, out = run(["--restored", tmp_path / "out", "--pairs", tmp_path / "data" / "pairs.csv",
                   "--json", tmp_path / "s.json"], capsys)
    t = json.loads((tmp_path / "s.json").read_text())["paired"]
    assert rc == 0 and t["psnr_rgb"] is None and t["psnr_infinite"] == ["x"] and t["ssim_y"] == pytest.approx(1)
    assert "inf" in out.out
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG truncated")
    cases = {("--restored", tmp_path / "empty", "--gt", tmp_path / "data" / "gt"): "no image files",
             ("--restored", tmp_path / "out", "--gt", tmp_path / "bad"): "x.png: cannot read image",
             ("--restored", tmp_path / "out", "--gt", tmp_path / "empty"): "no image files",
             ("--restored", tmp_path / "bad", "--gt", tmp_path / "data" / "gt"): "cannot read image",
             ("--restored", tmp_path / "out", "--gt", tmp_path / "out", "--weights", "w.pt"):
                 "both --reference and --weights",
             ("--restored", tmp_path / "out"): "nothing to score against"}
    for args, words in cases.items():
        rc, out = run([*args, "--json", tmp_path / "o.json"], capsys)
        assert rc in (1, 2) and out.err.count("\n") == 1 and words in out.err, (args, out.err)
    assert not (tmp_path / "o.json").exists()
