"""Tests of minidiff/eval/selector_eval.py: the Table 5 metrics (ZTA, mAP, CP, CR, CF1, OP, OR, OF1) on a
hand-made case with its edge cases (a task with no positive request, requests with no target task, nothing
positive at all), and against scikit-learn on random cases with ties (parity: scikit-learn is a test extra).

    python -m pytest tests/test_selector_eval.py -q          (a few seconds)
"""
import math

import numpy as np
import pytest
import torch

from minidiff.eval.selector_eval import selector_metrics


def test_metrics_hand_made():
    scores = torch.tensor([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0], [-1.0, -0.5, -0.1], [0.3, -2.0, 0.0]])
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    m = selector_metrics(scores, targets)
    # rows: [T,F,(0.5 fires)] wrong; [T,T,F] right; irrelevant, nothing fires: right; 0.3 fires: wrong
    assert m["ZTA"] == 0.5
    # task 2 has no positive: out of CP, CR, mAP. CP = (2/3 + 1) / 2, CR = (1 + 1) / 2
    assert math.isclose(m["CP"], 5 / 6) and m["CR"] == 1.0 and math.isclose(m["CF1"], 2 * 5 / 6 / (5 / 6 + 1))
    assert math.isclose(m["OP"], 3 / 5) and m["OR"] == 1.0
    # AP task 0: scores 2 (pos), 1 (pos), 0.3, -1 -> 1; task 1: 3 (pos) first -> 1
    assert m["mAP"] == 1.0
    none = selector_metrics(torch.zeros(2, 2) - 1, torch.zeros(2, 2, dtype=torch.bool))
    assert none["ZTA"] == 1.0 and none["OP"] == 0.0
    assert all(math.isnan(none[k]) for k in ("mAP", "CP", "CR", "OR"))
    with pytest.raises(ValueError):
        selector_metrics(torch.tensor([[float("nan")]]), torch.tensor([[True]]))


@pytest.mark.parity
def test_metrics_vs_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(100):
        q, t = rng.integers(1, 40), rng.integers(1, 9)
        s = rng.normal(size=(q, t)).round(rng.integers(0, 3))  # rounding makes ties
        y = rng.random((q, t)) < rng.random()
        m, pred, cols = selector_metrics(s, y), s > 0, np.flatnonzero(y.any(0))
        if len(cols) == 0:
            continue
        ref = {"mAP": np.mean([sk.average_precision_score(y[:, c], s[:, c]) for c in cols]),
               "CP": np.mean([sk.precision_score(y[:, c], pred[:, c], zero_division=0) for c in cols]),
               "CR": np.mean([sk.recall_score(y[:, c], pred[:, c], zero_division=0) for c in cols]),
               "OP": sk.precision_score(y.ravel(), pred.ravel(), zero_division=0),
               "OR": sk.recall_score(y.ravel(), pred.ravel(), zero_division=0),
               "ZTA": sk.accuracy_score(y, pred)}  # subset accuracy = eq. 7
        for k, v in ref.items():
            assert abs(m[k] - v) < 1e-12, (trial, k, m[k], v)
