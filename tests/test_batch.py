"""tools/sample.py --batch N (tools/_batch.py) on random tiny models: photos grouped by processed size, each
with the noise it gets alone, results within 1/255 of one photo at a time, records saying the batch size."""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import _batch  # noqa: E402
import sample  # noqa: E402


def test_batches_group_by_key_in_order():
    items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]
    assert _batch.plan_batches(items, 2) == [[1, 3], [4], [2, 5]]
    assert _batch.plan_batches(items, 1) == [[1], [3], [4], [2], [5]]


def test_batched_equals_one_at_a_time(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):  # two processed sizes: 3 photos of one, 2 of the other
        h = 64 if i % 2 == 0 else 48
        pixels = np.random.default_rng(i).integers(0, 256, (h, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"p{i}.png")
    base = ["--input", str(src), "--task", "derain", "dehaze", "--fake-weights", "--steps", "2",
            "--chain-steps", "1", "--max-side", "256", "--no-progress"]
    assert sample.main(base + ["--output", str(tmp_path / "one")]) == 0
    assert sample.main(base + ["--output", str(tmp_path / "many"), "--batch", "2"]) == 0
    batches = []
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "one" / f"p{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "many" / f"p{i}.png")).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1  # within 1/255
        rec = json.loads((tmp_path / "many" / f"p{i}.json").read_text())
        assert rec["tasks"] == ["derain", "dehaze"] and rec["chain_steps_used"] == 1
        batches.append(rec["timings_s"]["batch"])
    # sizes: p0, p2, p4 (one size) -> batches [p0, p2], [p4]; p1, p3 (the other) -> [p1, p3]
    assert batches == [2, 2, 2, 2, 1]
    one = json.loads((tmp_path / "one" / "p0.json").read_text())
    assert json.loads((tmp_path / "many" / "p0.json").read_text())["processed_size"] == one["processed_size"]
