"""Tests of minidiff.io.files: atomic writes (nothing half-written, no temporary file left behind, on success or
failure; the image and JSON writers go through them) and the SHA-256 digest.

    python -m pytest tests/test_files.py -q
"""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from minidiff.io.files import save_json_atomic, sha256_file
from minidiff.io.imageio import save_png_atomic


def test_atomic_writes_and_hash(tmp_path):
    save_png_atomic(Image.new("RGB", (3, 2), (1, 2, 3)), tmp_path / "x.png")
    save_json_atomic({"tasks": [], "score": -0.5}, tmp_path / "x.json")
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.png"]
    assert (np.asarray(Image.open(tmp_path / "x.png")) == (1, 2, 3)).all()

    class Broken:
        def save(self, *a, **k):
            raise OSError("disk full")
    with pytest.raises(OSError):
        save_png_atomic(Broken(), tmp_path / "y.png")
    with pytest.raises(ValueError):
        save_json_atomic({"nan": float("nan")}, tmp_path / "y.json")
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.png"]  # nothing half-written, no temp files left
    assert sha256_file(tmp_path / "x.png") == hashlib.sha256((tmp_path / "x.png").read_bytes()).hexdigest()
