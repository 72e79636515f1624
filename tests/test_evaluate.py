"""Tests of tools/evaluate.py and of the CLIP ViT-B/32 features behind it.

Fast: bad inputs (one line on stderr, exit 1, no output written), --save-stats round trip (cheap stand-in
features; the Inception loader is covered by tests/test_inception.py); issue 10: a tools/sample.py output
folder counts its results only, problems are found before any feature, Ctrl-C, an unwritable --json and NaN
statistics end in one line with nothing written.
Parity (oracle environment; MINIDIFF_ORACLE_PYTHON): CLIP features of the real demo photos equal clean-fid's
CLIP path (img_preprocess_clip + CLIP_fx) with the same random weights in ViT-B-32.pt's layout, and the
tool's FID/KID equal those computed from clean-fid's features.
Run: MINIDIFF_ORACLE_PYTHON=/work/venvs/oracle/bin/python python -m pytest tests/test_evaluate.py -q -s
--runslow (the parity test runs the full-size ViT-B/32 and is marked slow)
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.eval import metrics
from helpers import assert_close, photo_folder, run_oracle

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import _cli  # noqa: E402
import evaluate  # noqa: E402

DEMO = Path(photo_folder())


def make_folder(path, n, seed=0, size=(40, 30)):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"{i}.png")
    return str(path)


@pytest.fixture
def fake_features(monkeypatch):
    """Cheap 6-d features (channel means and stds) in place of a network, for the tool's plumbing."""
    def load(feature_type, weights, device="cpu"):
        def model(x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # [B, 3, H, W] -> [B, 6]
        pre = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255  # noqa: E731
        return metrics.FeatureExtractor(feature_type, model, pre, device)
    monkeypatch.setattr(metrics, "load_feature_extractor", load)


def run(argv, capsys):
    """evaluate.py as its __main__ runs it: main under _cli.run, which turns errors into the exit statuses
    (README "Exit status") with one line each; the test process's SIGTERM handler is put back after."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        rc = _cli.run(evaluate.main, [*map(str, argv), "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    return rc, capsys.readouterr()


def test_save_stats_roundtrip(tmp_path, capsys, fake_features):
    restored, ref = make_folder(tmp_path / "r", 5), make_folder(tmp_path / "g", 7, seed=1)
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights")
    rc, _ = run(["--restored", restored, "--reference", ref, "--weights", w, "--json", tmp_path / "a.json",
                 "--save-stats", tmp_path / "g.npz", "--features", "inception"], capsys)
    assert rc == 0
    rc, _ = run(["--restored", restored, "--reference", tmp_path / "g.npz", "--weights", w,
                 "--json", tmp_path / "b.json", "--features", "inception"], capsys)
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert rc == 0 and a["n_restored"] == 5 and a["n_reference"] == b["n_reference"] == 7
    assert a["kid_subset_size"] == 5 and a["kid_x100"] == pytest.approx(100 * a["kid"])
    # the .npz keeps float32 features: tiny differences only
    assert np.isclose(a["fid"], b["fid"], rtol=1e-6) and np.isclose(a["kid"], b["kid"], rtol=1e-5)
    assert a["weights_sha256"] == hashlib.sha256(b"weights").hexdigest()


BAD = {  # name -> (argv changes, expected message part)
    "empty folder": ({"--restored": "empty"}, "no image files"),
    "only non-image files": ({"--restored": "texts"}, "no image files"),
    "one image": ({"--restored": "one"}, "only 1 image"),
    "corrupt image": ({"--restored": "corrupt"}, "cannot read image"),
    "missing weights": ({"--weights": "nope.pt"}, "no such"),
    "other feature type": ({"--reference": "clip.npz"}, "clip_vit_b_32 features, but inception"),
    "no json": ({"--json": None}, "needs --json"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(tmp_path, capsys, fake_features, case):
    make_folder(tmp_path / "r", 3), make_folder(tmp_path / "g", 3), make_folder(tmp_path / "one", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("not an image")
    shutil.copytree(tmp_path / "r", tmp_path / "corrupt")
    (tmp_path / "corrupt" / "9.png").write_bytes(b"\x89PNG truncated")
    metrics.save_stats(str(tmp_path / "clip.npz"), np.random.rand(4, 512), "clip_vit_b_32")
    (tmp_path / "w.pt").write_bytes(b"x")
    args = {"--restored": "r", "--reference": "g", "--weights": "w.pt", "--json": "out.json"}
    args.update(BAD[case][0])
    argv = [x for k, v in args.items() if v is not None for x in (k, tmp_path / v)]
    argv += ["--features", "inception"]
    rc, out = run(argv, capsys)
    code = 1 if case == "missing weights" else 2  # CheckpointError: failed; MetricsError/UsageError: data/usage
    assert rc == code and out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert BAD[case][1] in out.err and not (tmp_path / "out.json").exists()


def test_cli_error_is_one_line(tmp_path):
    """As a user runs it: a wrong weights path gives one line on stderr, exit 1, no traceback, no JSON."""
    restored = make_folder(tmp_path / "r", 2)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--restored", restored,
                           "--reference", restored, "--weights", str(tmp_path / "nope.pth"),
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "nope.pth: no such weights file" in proc.stderr and not (tmp_path / "out.json").exists()


def sample_folder(path):
    """A folder as tools/sample.py writes it: per photo the result, the side-by-side and the JSON record."""
    make_folder(path, 3)
    for i in range(3):
        Image.open(path / f"{i}.png").save(path / f"{i}-compare.png")
        rec = {"mode": "plugin", "outputs": {"result": f"{i}.png", "compare": f"{i}-compare.png"}}
        (path / f"{i}.json").write_text(json.dumps(rec))
    return path


def test_sample_output_folder_counts_results_only(tmp_path, capsys, fake_features):
    restored, ref = sample_folder(tmp_path / "out"), make_folder(tmp_path / "g", 4, seed=1)
    (tmp_path / "w.pt").write_bytes(b"x")
    args = ["--restored", restored, "--reference", ref, "--weights", tmp_path / "w.pt", "--json",
            tmp_path / "r.json", "--features", "inception", "--save-stats", tmp_path / "stats" / "g.npz"]
    assert run(args, capsys)[0] == 0  # the stats folder is made on the way
    rc, out = run(args, capsys)  # and the outputs replaced by a second run
    assert rc == 0 and "restored: 3 images (a tools/sample.py folder: its results only" in out.out
    assert json.loads((tmp_path / "r.json").read_text())["n_restored"] == 3  # not 6
    assert (tmp_path / "stats" / "g.npz").is_file()


def test_problems_found_before_any_feature(tmp_path, capsys, monkeypatch, fake_features):
    calls = []
    monkeypatch.setattr(metrics, "files_features", lambda files, *a, **k: calls.append(files) or 1 / 0)
    make_folder(tmp_path / "r", 3), make_folder(tmp_path / "g", 3)
    (tmp_path / "r" / "9.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "w.pt").write_bytes(b"x")
    args = ["--restored", tmp_path / "r", "--reference", tmp_path / "g", "--weights", tmp_path / "w.pt",
            "--json", tmp_path / "o.json", "--features", "inception"]
    rc, out = run(args, capsys)
    assert rc == 2 and "9.png: cannot read image" in out.err and calls == []  # no reference features first
    (tmp_path / "r" / "9.png").unlink()
    monkeypatch.setattr(metrics, "files_features", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, out = run(args + ["--save-stats", tmp_path / "new" / "g.npz"], capsys)
    assert rc == 130 and out.err.strip().splitlines() == ["interrupted: no partial output was left behind"]
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "new").exists()


def test_cli_output_and_statistics_problems_are_one_line(tmp_path):
    """As a user runs it: a --json that cannot be written, statistics with NaN (each used to end in a
    traceback after the compute): one line, nothing written."""
    r = make_folder(tmp_path / "r", 2)
    (tmp_path / "file").write_text("x")
    metrics.save_stats(str(tmp_path / "nan.npz"), np.full((4, 512), np.nan), "clip_vit_b_32")
    cases = {("--reference", r, "--json", tmp_path / "file" / "o.json"): "cannot write to --json",
             ("--reference", tmp_path / "nan.npz", "--json", tmp_path / "o.json"): "(mu) is not finite"}
    for args, words in cases.items():
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--restored", r,
                               "--weights", str(tmp_path / "nope.pt"), *map(str, args)],
                              capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr  # usage / data
    assert sorted(os.listdir(tmp_path)) == ["file", "nan.npz", "r"]


@pytest.fixture(scope="module")
def cleanfid_clip(tmp_path_factory):
    """Random ViT-B-32.pt-layout weights and clean-fid's CLIP features of the demo photos (oracle run)."""
    tmp = tmp_path_factory.mktemp("clip")
    run_oracle(REPO / "tests" / "oracle" / "cleanfid_clip.py", DEMO, tmp / "ViT-B-32.pt", tmp / "ref.npy")
    return tmp / "ViT-B-32.pt", np.load(tmp / "ref.npy")


@pytest.mark.slow  # a full-size network: --runslow (CI runs it)
@pytest.mark.parity
def test_clip_features_and_tool_equal_cleanfid(cleanfid_clip, tmp_path, capsys):
    weights, ref = cleanfid_clip
    files = metrics.list_images(str(DEMO))  # sorted, as the oracle's features
    k = len(files) // 2  # first half "restored", the rest "reference" (9 demo photos: 4 | 5)
    for i, f in enumerate(files):
        (tmp_path / ("r" if i < k else "g")).mkdir(exist_ok=True)
        os.symlink(f, tmp_path / ("r" if i < k else "g") / os.path.basename(f))
    rc, _ = run(["--restored", tmp_path / "r", "--reference", tmp_path / "g", "--weights", weights,
                 "--json", tmp_path / "out.json", "--save-stats", tmp_path / "g.npz", "--batch-size", 4],
                capsys)
    assert rc == 0
    ex = metrics.load_feature_extractor("clip_vit_b_32", str(weights))
    ours = np.concatenate([metrics.files_features(files[:k], ex, batch_size=4, progress=False),
                           metrics.load_stats(str(tmp_path / "g.npz"), "clip_vit_b_32")["feats"]])
    assert ours.dtype == np.float32
    # 1e-4 x scale: float32 ViT-B/32 of two torch builds (2.13 vs 2.14), SDPA vs nn.MultiheadAttention
    assert_close(ours, ref, 1e-4, "clip_vit_b_32 features (real photos)")
    res = json.loads((tmp_path / "out.json").read_text())
    fid = metrics.frechet_distance(*metrics.statistics(ref[:k]), *metrics.statistics(ref[k:]))
    kid = metrics.kernel_distance(ref[:k], ref[k:])
    print(f"tool fid {res['fid']:.6f} kid {res['kid']:.6f}; from clean-fid features: {fid:.6f} {kid:.6f}")
    # features agree to ~1e-6 relative; FID/KID are smooth in them (few images: the eps-regularised sqrtm)
    assert abs(res["fid"] - fid) <= 1e-4 * fid and abs(res["kid"] - kid) <= 1e-4 * abs(kid)
