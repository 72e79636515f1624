"""Sharded restoration (tools/_shard.py) under torchrun, on the CPU with gloo and random tiny models.

Fast: the share of each rank, a failing photo recorded while the rank goes on, the merged summary.
Slow (two torchrun launches, ~25 s on 2 shared cores): 2 processes restore every photo exactly once with the
pixels of a one-process run, each record naming its rank and world size, one summary; a rerun on 3 processes
with --skip-existing restores only the missing photo (two ranks have nothing to do and still join the summary).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import _shard  # noqa: E402


def test_shares_cover_every_photo_once():
    photos = [f"p{i}" for i in range(7)]
    shares = [_shard.Shard(r, 3).share(photos) for r in range(3)]
    assert shares == [["p0", "p3", "p6"], ["p1", "p4"], ["p2", "p5"]]
    assert _shard.Shard(4, 8).share(photos[:2]) == []  # more ranks than photos: some have none
    assert _shard.Shard().share(photos) == photos and not _shard.Shard().distributed


def test_failing_photo_is_recorded_and_the_rank_goes_on(tmp_path, capsys):
    def restore_one(path):
        if path == "b.png":
            raise RuntimeError("boom\nsecond line")
    (tmp_path / "c.failed.json").write_text("{}")  # an earlier failure of c, restored now: removed
    shard = _shard.Shard(1, 2)
    done, failed = _shard.restore_share(shard, ["a.png", "b.png", "c.png"], restore_one, str(tmp_path),
                                        lambda p: p[:-4])
    assert done == 2 and failed == [("b.png", "RuntimeError: boom")]
    rec = json.loads((tmp_path / "b.failed.json").read_text())
    assert rec["error"] == "RuntimeError: boom" and rec["rank"] == 1 and rec["world_size"] == 2
    assert not (tmp_path / "c.failed.json").exists()
    with pytest.raises(RuntimeError):  # one process: the error stops the run, as before
        _shard.restore_share(_shard.Shard(), ["b.png"], restore_one, str(tmp_path), lambda p: p[:-4])
    assert _shard.finish(_shard.Shard(), 3, failed, 1, 0.0) == 1
    out = capsys.readouterr()
    assert "summary: 3 done, 1 failed, 1 skipped" in out.out and "failed: b.png: RuntimeError: boom" in out.err


def photos(folder, n=5):
    folder.mkdir()
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    return folder


def sample(out, src, nproc=None, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every process
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc else [])
    cmd = launch + [str(REPO / "tools" / "sample.py"), "--input", str(src), "--task", "derain", "--fake-weights",
                    "--steps", "2", "--max-side", "256", "--output", str(out), "--no-progress", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    src = photos(tmp_path / "in")
    sample(tmp_path / "one", src)
    proc = sample(tmp_path / "two", src, 2)
    assert proc.stdout.count("summary: ") == 1 and "summary: 5 done, 0 failed, 0 skipped" in proc.stdout
    for i in range(5):
        rec = json.loads((tmp_path / "two" / f"p{i}.json").read_text())
        assert (rec["rank"], rec["world_size"]) == (i % 2, 2)  # rank r took photos r, r + 2, ...
        a = np.asarray(Image.open(tmp_path / "one" / f"p{i}.png"))
        b = np.asarray(Image.open(tmp_path / "two" / f"p{i}.png"))
        assert a.shape == b.shape and np.array_equal(a, b)
    before = (tmp_path / "two" / "p0.json").stat().st_mtime_ns
    (tmp_path / "two" / "p3.json").unlink()  # as if the rank died before p3's record
    proc = sample(tmp_path / "two", src, 3, "--skip-existing")
    assert "summary: 1 done, 0 failed, 4 skipped" in proc.stdout
    assert json.loads((tmp_path / "two" / "p3.json").read_text())["world_size"] == 3
    assert (tmp_path / "two" / "p0.json").stat().st_mtime_ns == before
