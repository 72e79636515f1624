"""Evaluating the Plugin-Selector: the metrics of the paper's Table 5 (`selector_metrics`) and the scores of
held-out instructions paired with photos (`evaluate`).

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024),
sec. 4 ("Metrics": the multi-label classification metrics of Chen et al. [6], ML-GCN, plus ZTA, eq. 7) and
Table 5. Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb demo.py l.145-160 (a plugin is selected when its
score is above theta = 0). The official evaluation code was not released.

For scores [Q, T] (Q requests, T tasks) and targets [Q, T] bool, a task is predicted for a request when its
score is above theta. With TP_t, FP_t, FN_t the counts of task t over the requests:

    ZTA  (eq. 7)  share of requests whose predictions are ALL right: every target task above theta and
                  every other task at most theta (a request with no target task counts when none fires)
    mAP           mean over tasks of the average precision of the task's scores (scikit-learn's
                  average_precision_score: sum over thresholds of (R_n - R_n-1) P_n, ties grouped)
    CP, CR        mean over tasks of TP_t / (TP_t + FP_t) and of TP_t / (TP_t + FN_t)
    CF1           2 CP CR / (CP + CR)  (from the averages, as [6] does; not the mean of per-task F1)
    OP, OR, OF1   the same pooled over all (request, task) pairs: sum TP / sum (TP + FP), ...

Edge cases. A task with no positive request has no recall and no average precision: it is left out of
mAP, CP and CR (it still counts in OP as false positives, and in ZTA). A task that is never predicted has
precision 0 (scikit-learn's zero_division=0). With no positive pair at all, mAP, CP, CR, OR are NaN (the
empty mean); F1 is 0 when P + R = 0. A request with no target task (an irrelevant one) counts in ZTA and adds
false positives to the precisions; it adds nothing to the recalls.
"""
import random

import numpy as np
import torch

TABLE5 = ("ZTA", "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")


def _f1(p, r):
    return 0.0 if p + r == 0 or np.isnan(p + r) else 2 * p * r / (p + r)


def average_precision(targets, scores):
    """AP of one task: targets [Q] bool, scores [Q] -> float (scikit-learn's definition; ties grouped)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], targets[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each group of equal scores
    tp = np.cumsum(y)[last]  # true positives when thresholding at each distinct score, high to low
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def selector_metrics(scores, targets, threshold=0.0):
    """Table 5 metrics (ZTA, mAP, CP, CR, CF1, OP, OR, OF1) of scores [Q, T] against targets [Q, T] bool;
    a task is predicted when its score is above `threshold`. Returns {name: float}; see the module docstring
    for the definitions and the edge cases."""
    s = scores.detach().cpu().double().numpy() if torch.is_tensor(scores) else np.asarray(scores, np.float64)
    y = targets.cpu().numpy() if torch.is_tensor(targets) else np.asarray(targets)
    y = y.astype(bool)
    if s.ndim != 2 or s.shape != y.shape or s.shape[0] == 0:
        raise ValueError(f"scores {s.shape} and targets {y.shape} must both be [Q, T] with Q > 0")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    pred = s > threshold  # [Q, T]
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)  # [T] each
    has_pos = y.any(0)  # [T]: tasks with at least one positive request
    prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)  # [T]; never predicted -> 0
    rec = tp / np.maximum(tp + fn, 1)  # [T]; meaningful where has_pos
    nan = float("nan")
    cp = float(prec[has_pos].mean()) if has_pos.any() else nan
    cr = float(rec[has_pos].mean()) if has_pos.any() else nan
    op = float(tp.sum() / (tp.sum() + fp.sum())) if tp.sum() + fp.sum() > 0 else 0.0
    orr = float(tp.sum() / y.sum()) if y.any() else nan
    aps = [average_precision(y[:, t], s[:, t]) for t in np.flatnonzero(has_pos)]
    return {"ZTA": float((pred == y).all(1).mean()), "mAP": float(np.mean(aps)) if aps else nan,
            "CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orr, "OF1": _f1(op, orr)}


@torch.no_grad()
def request_scores(selector, visual, text):
    """Selector scores of every task for each request: visual [Q, T, D] (the photo's pooled TPB features
    through each task's plugin), text [Q, D] -> [Q, T] (PluginSelector.forward, one request per row)."""
    p = next(selector.parameters())
    v = torch.nn.functional.normalize(selector.proj_v(visual.to(p.device, p.dtype)), dim=-1)  # [Q, T, D]
    q = torch.nn.functional.normalize(selector.proj_t(text.to(p.device, p.dtype)), dim=-1)  # [Q, D]
    return (selector.logit_scale.exp() * torch.einsum("qtd,qd->qt", v, q)).float().cpu()  # [Q, T]


def pair_photos(requests, photos_per_task, tasks, seed):
    """A photo for each request [(text, tasks)]: one of a task it names, drawn by random.Random(seed)
    (first its task, then a photo of that task's folder). Returns [photo index]."""
    rng = random.Random(seed)
    return [rng.choice(photos_per_task[tasks.index(rng.choice(req_tasks))]) for _, req_tasks in requests]


def evaluate(selector, sets, text_feats, photo_feats, photos_per_task, tasks, threshold=0.0, seed=0):
    """Table 5 for each setting: sets {name: [(text, tasks)]}, text_feats {text: [D]}, photo_feats
    [n_photos, T, D] (every plugin of `tasks` on every photo), photos_per_task [[photo index]] in task order.
    Returns {name: {"requests": Q, metric: value}}."""
    out = {}
    for name, requests in sets.items():
        photos = pair_photos(requests, photos_per_task, tasks, seed)
        text = torch.stack([text_feats[t] for t, _ in requests])  # [Q, D]
        scores = request_scores(selector, photo_feats[photos], text)  # [Q, T]
        targets = torch.tensor([[t in req for t in tasks] for _, req in requests])  # [Q, T]
        out[name] = {"requests": len(requests), **selector_metrics(scores, targets, threshold)}
    return out


def format_table(results):
    """Terminal table of evaluate()'s results, one row per setting, Table 5's columns."""
    head = f"{'setting':<14}{'requests':>9}" + "".join(f"{m:>7}" for m in TABLE5)
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        rows.append(f"{name:<14}{r['requests']:>9}" + "".join(f"{r[m]:>7.3f}" for m in TABLE5))
    return "\n".join(rows)
