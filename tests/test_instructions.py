"""Tests of minidiff/train/instructions.py: the packaged instruction corpus (sizes the issue asks for, no
duplicates), its train/test split (disjoint, complete, stable across Python versions: committed values),
adding a task by adding a key, and the seeded combinations of Table 5's settings.

    python -m pytest tests/test_instructions.py -q          (under a second)
"""
import json

from minidiff.train import instructions as ins
from minidiff.plugin.plugin import TASKS


def test_corpus_sizes_and_split(tmp_path):
    corpus = ins.load_corpus()
    assert corpus.tasks == TASKS and all(len(corpus.single[t]) >= 80 for t in TASKS)
    assert len(corpus.multi) >= 200 and len(corpus.irrelevant) >= 200
    train, test = corpus.part("train"), corpus.part("test")
    a, b = {s for s, _ in train.labelled()}, {s for s, _ in test.labelled()}
    assert not a & b and a | b == {s for s, _ in corpus.labelled()}  # disjoint, and nothing lost
    assert all(len(test.single[t]) >= 10 for t in TASKS)
    assert len(test.multi) >= 20 and len(test.irrelevant) >= 20
    # stable: SHA-256 of the normalised sentence, the same on every Python (values committed here)
    golden = {"remove the rain": "test", "REMOVE  rain": "test", "it's all foggy": "train",
              "my selfie is blurry": "train", "add a cat": "train", "remove the rain and the haze": "test"}
    assert {s: ins.split_of(s) for s in golden} == golden
    # adding a task = adding a key; the new task's multi-task sentences are dropped by restrict()
    raw = json.loads(ins.CORPUS.read_text())
    raw["tasks"]["recolor"] = ["make the colours natural again", "fix the colour cast"]
    raw["multi"].append({"text": "remove the rain and fix the colour cast", "tasks": ["derain", "recolor"]})
    (tmp_path / "c.json").write_text(json.dumps(raw))
    mine = ins.load_corpus(tmp_path / "c.json")
    assert mine.tasks[-1] == "recolor" and len(mine.restrict(["derain"]).multi) < len(mine.multi)
    sets = ins.evaluation_sets(test, seed=0)
    assert sets == ins.evaluation_sets(test, seed=0) and all(sets.values())
