"""The small family's photo manifest, minidiff.train.small_data.photo_paths, and the committed held-out crops.

No network: the prepared folder is faked in tmp_path (tools/small_data.py itself needs the registries).
"""
import hashlib
import json
import os

import pytest
from PIL import Image

from minidiff.train.small_data import (MANIFEST, UsageError, expected_files, load_manifest, photo_paths,
                                       resize_short_side, view_box)

HELDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout")
KNOWN_LICENCES = {"public-domain", "CC0-1.0", "CC-BY-2.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0",
                  "GPL-2.0-or-later", "GFDL"}


def test_manifest_schema():
    man = load_manifest()
    photos = man["photos"]
    assert 40 <= len(photos) <= 200
    ids = [p["id"] for p in photos]
    assert len(ids) == len(set(ids))
    for p in photos:
        for key in ("id", "source", "package", "version", "path", "licence", "attribution", "sha256", "split",
                    "views"):
            assert p.get(key), (p.get("id"), key)
        assert p["source"] in ("pypi", "debian")
        assert p["licence"] in KNOWN_LICENCES, p
        assert len(p["sha256"]) == 64 and int(p["sha256"], 16) >= 0
        assert p["split"] in ("train", "heldout")
        assert p["views"][0] == "full" and set(p["views"]) <= {"full", "a", "b"}
    # one version per package, so the set is reproducible
    versions = {}
    for p in photos:
        assert versions.setdefault((p["source"], p["package"]), p["version"]) == p["version"]
    train = {(p["package"], p["path"]) for p in photos if p["split"] == "train"}
    held = {(p["package"], p["path"]) for p in photos if p["split"] == "heldout"}
    assert not train & held
    assert len(held) >= 10
    assert len({p["sha256"] for p in photos}) == len(photos)  # no photo twice
    assert 0.1 <= len(expected_files(man, "heldout")) / len(expected_files(man)) <= 0.25


def test_views_and_resize():
    assert view_box((400, 300), "full") == (0, 0, 400, 300)
    assert view_box((400, 300), "a") == (0, 0, 200, 300)
    assert view_box((401, 300), "b") == (201, 0, 401, 300)
    assert view_box((300, 400), "b") == (0, 200, 300, 400)
    assert resize_short_side(Image.new("RGB", (640, 427))).size == (384, 256)
    assert resize_short_side(Image.new("RGB", (300, 600))).size == (256, 512)


def _fake_prepared(root, n=3):
    files = []
    for split in ("train", "heldout"):
        os.makedirs(root / split)
        for i in range(n):
            rel = f"{split}/p{i}.png"
            Image.new("RGB", (300, 256), (i * 40, 10, 200)).save(root / rel)
            sha = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            files.append({"file": rel, "photo": f"p{i}", "view": "full", "split": split, "sha256": sha})
    (root / "manifest.json").write_text(json.dumps({"complete": True, "files": files}))
    return files


def test_photo_paths_ok(tmp_path):
    _fake_prepared(tmp_path)
    train = photo_paths(str(tmp_path), "train")
    assert train == sorted(train) and [os.path.basename(p) for p in train] == ["p0.png", "p1.png", "p2.png"]
    assert all(os.sep + "train" + os.sep in p for p in train)
    assert len(photo_paths(str(tmp_path), "heldout")) == 3


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_photo_paths_refusals(tmp_path):
    with pytest.raises(UsageError) as e:  # nothing prepared
        photo_paths(str(tmp_path), "train")
    _one_line(e, "manifest.json", "tools/small_data.py --output")
    _fake_prepared(tmp_path)
    with pytest.raises(UsageError) as e:
        photo_paths(str(tmp_path), "test")
    _one_line(e, "train", "heldout")
    os.remove(tmp_path / "train" / "p1.png")
    with pytest.raises(UsageError) as e:
        photo_paths(str(tmp_path), "train")
    _one_line(e, "p1.png", "missing", "python tools/small_data.py --output")
    assert len(photo_paths(str(tmp_path), "heldout")) == 3  # the other split is unaffected
    Image.new("RGB", (300, 256), (1, 2, 3)).save(tmp_path / "heldout" / "p2.png")  # changed content
    with pytest.raises(UsageError) as e:
        photo_paths(str(tmp_path), "heldout")
    _one_line(e, "p2.png", "sha256", "python tools/small_data.py --output")


def test_photo_paths_incomplete_or_corrupt_index(tmp_path):
    files = _fake_prepared(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": False, "files": files}))
    with pytest.raises(UsageError) as e:
        photo_paths(str(tmp_path), "train")
    _one_line(e, "did not finish")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError) as e:
        photo_paths(str(tmp_path), "train")
    _one_line(e, "unreadable")


def test_committed_heldout_crops():
    names = sorted(n for n in os.listdir(HELDOUT) if n.endswith(".png"))
    assert len(names) == 6
    man = {p["id"]: p for p in load_manifest()["photos"]}
    readme = open(os.path.join(HELDOUT, "README.md"), encoding="utf-8").read()
    for n in names:
        photo = man[n[:-4]]
        assert photo["split"] == "heldout"
        assert photo["licence"] in ("public-domain", "CC0-1.0")
        assert n in readme
        with Image.open(os.path.join(HELDOUT, n)) as im:
            im.load()
            assert im.size == (128, 128) and im.mode == "RGB"


def test_manifest_is_package_data():
    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    assert "data/small_photos.json" in setup
    assert os.path.isfile(MANIFEST)


def test_tool_refuses_a_missing_manifest_in_one_line(tmp_path):
    import subprocess
    import sys
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "small_data.py")
    r = subprocess.run([sys.executable, tool, "--output", str(tmp_path / "out"), "--cache", str(tmp_path / "c"),
                        "--manifest", str(tmp_path / "none.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.json'}: no such manifest"]
