"""Diff-Plugin's Plugin-Selector: picks the Task-Plugins that a text instruction asks for.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024),
sec. 3.4 (eq. 4-5). Reference implementation mirrored: yuhaoliu7456/Diff-Plugin @ 79e12bb, modules/prompt.py
(PromptTunnerModel with tunner_for_visual=True) and demo.py l.85-160 (null entry, scoring, selection).

Each plugin's TPB turns the photo's CLIP features into 256 prompt tokens; their max over tokens goes through
the visual head `proj_v`, the pooled CLIP text embedding of the instruction through the text head `proj_t`;
the score is exp(logit_scale) x cosine. A "null" entry, the pooled embedding of " " put through the VISUAL
head, stands for "nothing to do". Plugins scoring above the threshold theta (0) run, in the official order
(the paper writes s >= theta; the code s > 0 after zeroing negatives, which is what runs here).

Composite requests ("a photo taken in a storm") are this project's own addition: the official code has no
such table and the paper's only composite example (Fig. 7, "old photo" -> restoration + colorization) uses
plugins that were not released. COMPOSITE is read from minidiff/data/composite.json, a list of
{"pattern", "tasks", "why"}; `load_composite(path)` reads a user's own file in the same format (sample.py
--composite FILE). Tasks it adds are reported apart from the ones the scores chose.

    selector = load_selector("pre-trained/plugin_selector/PromptTunner.pt")   # minidiff.plugin.files
    tasks, scores = select(selector, sd, clip_vision, plugins, photo, "remove the rain please")
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff.plugin.plugin import TASKS, clip_features

NULL = "null"  # the score entry meaning "no plugin": its row is last, as in the official demo (index 8)
NULL_TEXT = " "  # the text whose pooled embedding is the null entry (demo.py l.98-100)
COMPOSITE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "composite.json")


def load_composite(path=COMPOSITE_PATH):
    """A composite table: JSON list of {"pattern": regex, "tasks": [task, ...], "why": text} ->
    [(pattern, tasks, why)]. Patterns match case-insensitively on word boundaries. ValueError (one line)
    for a file that is not such a list or a pattern that does not compile."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        table = [(e["pattern"], tuple(e["tasks"]), e.get("why", "")) for e in entries]
        for pattern, tasks, _ in table:
            re.compile(pattern)
            if not tasks or not all(isinstance(t, str) for t in tasks):
                raise ValueError(f"pattern {pattern!r}: 'tasks' must be a non-empty list of task names")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the composite table ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, re.error) as e:
        raise ValueError(f"{path}: not a composite table, a JSON list of {{\"pattern\", \"tasks\", "
                         f"\"why\"}} ({type(e).__name__}: {e})") from None
    return table


COMPOSITE = load_composite()  # this project's table (see the module docstring), not the paper's


class PluginSelector(nn.Module):
    """PromptTunnerModel (visual variant): proj_v, proj_t Linear(768, 768) and a learned logit_scale."""

    def __init__(self, dim=768):
        super().__init__()
        self.proj_v = nn.Linear(dim, dim)  # visual head VP: max-pooled TPB tokens -> shared space
        self.proj_t = nn.Linear(dim, dim)  # text head TP: pooled CLIP text embedding -> shared space
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's temperature init, 0-d

    def forward(self, visual, text):
        """visual [N, dim] (max-pooled TPB tokens per plugin + the null row), text [1, dim] -> scores [N]."""
        v = F.normalize(self.proj_v(visual), dim=-1)  # [N, dim], unit length
        q = F.normalize(self.proj_t(text), dim=-1)  # [1, dim]
        return self.logit_scale.exp() * (v @ q.T)[:, 0]  # [N]: exp(logit_scale) * cosine


@torch.no_grad()
def text_embedding(sd, text):
    """Pooled CLIP text embedding [1, 768] (final-LN state at the first end-of-text token), no mask."""
    p = next(sd.text_encoder.parameters())
    _, pooled = sd.text_encoder(sd.tokenizer(text).to(p.device))
    return pooled


def composite_tasks(prompt, available, table=None):
    """Sub-tasks from the composite table (default COMPOSITE) whose pattern occurs in `prompt`, among
    `available`, and the patterns that matched (for the record)."""
    tasks, matched = [], []
    for pattern, subtasks, _ in COMPOSITE if table is None else table:
        if re.search(rf"\b(?:{pattern})\b", prompt, flags=re.IGNORECASE):
            matched.append(pattern)
            tasks += [t for t in subtasks if t in available and t not in tasks]
    return tasks, matched


def official_order(tasks, available):
    """Official task order (TASKS) first, then other names in the order of `available`."""
    rank = {t: i for i, t in enumerate(list(TASKS) + [t for t in available if t not in TASKS])}
    return sorted(set(tasks), key=rank.__getitem__)


@torch.no_grad()
def scores(selector, sd, clip_vision, plugins, image, prompt, features=None):
    """Raw scores {task: float, ..., "null": float} of `prompt` for `image` (the photo as loaded);
    features: clip_features(clip_vision, image) when the caller already has them."""
    p = next(selector.parameters())
    feats = features if features is not None else clip_features(clip_vision, image)  # [1, 256, clip_dim]
    rows = []
    for plugin in plugins:  # each TPB where its weights are; the max over the 256 tokens -> [768]
        w = next(plugin.tpb.parameters())
        rows.append(plugin.tpb(feats.to(w.device, w.dtype))[0].amax(dim=0).to(p.device, p.dtype))
    # null row: 256 equal copies of the " " embedding in the official code; their max is the embedding itself
    rows.append(text_embedding(sd, NULL_TEXT)[0].to(p.device, p.dtype))
    s = selector(torch.stack(rows), text_embedding(sd, prompt).to(p.device, p.dtype))  # [N + 1]
    return {name: float(v) for name, v in zip([pl.task for pl in plugins] + [NULL], s.tolist())}


def chosen_by_scores(scores, threshold=0.0):
    """The plugins whose score is above `threshold` (the null entry is not a plugin), in score-table order."""
    return [t for t, v in scores.items() if t != NULL and v > threshold]


def select(selector, sd, clip_vision, plugins, image, prompt, threshold=0.0, features=None, composite=None):
    """Tasks to run for `prompt` and the raw scores (negative values kept, "null" included).

    As demo.py: a plugin runs when its score is above `threshold` (0: negative scores are zeroed, then > 0);
    when nothing is, the null entry wins and the list is empty (the photo stays as it is). A null score above
    the threshold beside real tasks changes nothing (null is the identity). Tasks of the composite table
    (`composite`, default COMPOSITE; [] for none) are added. plugins: list of TaskPlugin (or a
    {task: TaskPlugin} dict). Returns (tasks in official order, scores).
    """
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: say what to do, e.g. 'remove the rain'")
    plugins = list(plugins.values()) if isinstance(plugins, dict) else list(plugins)
    names = [pl.task for pl in plugins]
    s = scores(selector, sd, clip_vision, plugins, image, prompt, features)
    chosen = chosen_by_scores(s, threshold) + composite_tasks(prompt, names, composite)[0]
    return official_order(chosen, names), s
