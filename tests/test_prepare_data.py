"""tools/prepare_data.py and minidiff/data/datasets.json on small fake layouts built in the test.

The manifest names the eight tasks' training and test sets; the tool pairs by the manifest's key pattern,
reports what is off on one line each (files without a partner, unreadable files, counts), writes the training
CSV tools/train.py reads, the test listing tools/evaluate.py reads and a flat folder of links to the test
inputs; a layout with nothing usable is one error line, nothing written.
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minidiff.train import datasets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import evaluate  # noqa: E402
import prepare_data  # noqa: E402


def img(path, seed=0, size=(24, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def run(argv, capsys):
    rc = prepare_data.run(prepare_data.main, [str(a) for a in argv])
    return rc, capsys.readouterr()


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_manifest_names_the_papers_sets():
    tasks = prepare_data.load_manifest()
    assert sorted(tasks) == sorted(["desnow", "dehaze", "deblur", "derain", "lowlight", "face", "demoire",
                                    "highlight"])
    names = json.dumps(tasks)
    for words in ("Snow100K", "RESIDE", "GoPro", "RealBlur-J", "Rain13K", "SPA-Data", "LOL", "FFHQ", "LFW",
                  "LCDMoire", "SHIQ", "RTTS"):
        assert words in names
    for t in tasks.values():
        for split in ("train", "test"):
            s = t[split]
            assert s["source"] and s["dataset"] and (s["input"] or s["gt"]) and s["key"]
    assert tasks["deblur"]["train"]["count"] == 2103 and tasks["derain"]["train"]["count"] == 13712
    assert "datasets.json" in (REPO / "setup.py").read_text()


def test_lowlight_train_and_test(tmp_path, capsys):
    root = tmp_path / "data"
    for i in range(4):
        img(root / f"LOLdataset/our485/low/{i}.png", i)
        img(root / f"LOLdataset/our485/high/{i}.png", 10 + i)
    img(root / "LOLdataset/our485/low/9.png", 9)  # no ground truth
    (root / "LOLdataset/our485/high/3.png").write_bytes(b"\x89PNG broken")  # unreadable
    for s in ("DICM", "LIME"):
        img(root / f"lowlight_test/{s}/01.jpg", 5)  # the same file name in two sets: named DICM-01, LIME-01
    rc, out = run(["lowlight", "--root", root, "--out", tmp_path / "lists"], capsys)
    assert rc == 0, out.err
    err = out.err.strip().splitlines()
    assert "1 input(s) without ground truth, left out: 9" in err[0]
    assert "1 unreadable file(s), their pairs left out: LOLdataset/our485/high/3.png" in err[1]
    assert "3 usable, the published count is 485" in err[2] and len(err) == 3
    train = rows(tmp_path / "lists" / "lowlight_train.csv")
    assert train[0] == ["image", "conditioning_image"]
    assert train[1] == ["LOLdataset/our485/high/0.png", "LOLdataset/our485/low/0.png"] and len(train) == 4
    pairs = datasets.list_pairs(str(tmp_path / "lists" / "lowlight_train.csv"), str(root))  # train.py's reader
    assert [Path(p).name for p, _ in pairs] == ["0.png", "1.png", "2.png"]
    assert all("low" in p and "high" in g for p, g in pairs)
    test = rows(tmp_path / "lists" / "lowlight_test.csv")
    assert test == [["name", "input", "gt"], ["DICM-01", "../data/lowlight_test/DICM/01.jpg", ""],
                    ["LIME-01", "../data/lowlight_test/LIME/01.jpg", ""]]
    links = sorted(p.name for p in (tmp_path / "lists" / "lowlight_test_input").iterdir())
    assert links == ["DICM-01.jpg", "LIME-01.jpg"]
    # a second run replaces the listings and the link folder
    assert run(["lowlight", "--root", root, "--out", tmp_path / "lists", "--split", "test"], capsys)[0] == 0


def test_deblur_nested_names_test_list_and_evaluate_pairs(tmp_path, capsys):
    root = tmp_path
    for seq in ("GOPR1", "GOPR2"):  # frame names repeat across sequences
        for f in ("000001", "000002"):
            img(root / f"GOPRO_Large/train/{seq}/blur/{f}.png", 1)
            img(root / f"GOPRO_Large/train/{seq}/sharp/{f}.png", 2)
    rb = "RealBlur-J_ECC_IMCORR_centroid_itensity_ref"
    for scene in ("scene001", "scene230"):
        for n in (1, 2):
            img(root / f"{rb}/{scene}/blur/blur_{n}.png", n)
            img(root / f"{rb}/{scene}/gt/gt_{n}.png", 3 + n)
    (root / "RealBlur_J_test_list.txt").write_text(
        "".join(f"{rb}/scene230/gt/gt_{n}.png {rb}/scene230/blur/blur_{n}.png\n" for n in (1, 2)))
    rc, out = run(["deblur", "--root", root], capsys)
    assert rc == 0, out.err
    train = rows(root / "deblur_train.csv")
    assert len(train) == 5 and train[1] == ["GOPRO_Large/train/GOPR1/sharp/000001.png",
                                            "GOPRO_Large/train/GOPR1/blur/000001.png"]
    test = rows(root / "deblur_test.csv")
    assert [r[0] for r in test[1:]] == ["scene230-1", "scene230-2"]  # only the list's pairs
    gt = evaluate.read_pairs(str(root / "deblur_test.csv"))
    assert gt["scene230-2"] == str(root / f"{rb}/scene230/gt/gt_2.png")
    assert sorted(p.name for p in (root / "deblur_test_input").iterdir()) == ["scene230-1.png", "scene230-2.png"]


def test_many_to_one_and_clean_only(tmp_path, capsys):
    for n in ("0001", "0002"):
        img(tmp_path / f"OTS/clear/{n}.jpg")
        for a in ("0.8_0.2", "1_0.16"):
            img(tmp_path / f"OTS/hazy/{n}_{a}.jpg")
    rc, out = run(["dehaze", "--root", tmp_path, "--split", "train"], capsys)
    train = rows(tmp_path / "dehaze_train.csv")
    assert rc == 0 and len(train) == 5 and train[2] == ["OTS/clear/0001.jpg", "OTS/hazy/0001_1_0.16.jpg"]
    for i in range(3):
        img(tmp_path / f"images1024x1024/00000/0000{i}.png", i)
    rc, out = run(["face", "--root", tmp_path, "--split", "train"], capsys)
    train = rows(tmp_path / "face_train.csv")
    assert rc == 0 and train[1] == ["images1024x1024/00000/00000.png"] * 2 and "--degrade face" in out.out


@pytest.mark.parametrize("case", ["no files", "nothing pairs", "unknown task", "not a folder", "no task"])
def test_bad_layouts_are_one_line(tmp_path, capsys, case):
    root = tmp_path / "data"
    root.mkdir()
    if case == "nothing pairs":
        img(root / "SHIQ_data_10825/test/00001_A.png")
        img(root / "SHIQ_data_10825/test/00002_D.png")
    argv = {"no files": ["highlight", "--root", root], "nothing pairs": ["highlight", "--root", root,
            "--split", "test"], "unknown task": ["derainz", "--root", root],
            "not a folder": ["highlight", "--root", root / "nope"], "no task": ["--root", root]}[case]
    rc, out = run(argv, capsys)
    last = out.err.strip().splitlines()[-1]
    status = prepare_data.exit_status(prepare_data.UsageError("x"))  # tools/_cli.py's table: a refused request
    assert rc == status != 0 and last.startswith("error: ") and "Traceback" not in out.err, out.err
    words = {"no files": "no files match", "nothing pairs": "no usable pairs", "unknown task": "unknown task",
             "not a folder": "not a folder", "no task": "give TASK"}[case]
    assert words in last
    assert not list(root.glob("*.csv"))


def test_list_prints_every_source(capsys):
    rc, out = run(["--list"], capsys)
    assert rc == 0 and out.out.count("get: ") == 16 and "Snow100K" in out.out
