"""Tests of minidiff/train/selector_training.py and the selector tools: eq. 6 against a loop-by-loop computation,
the batch draws, learning with tiny networks (the loss falls, held-out single-task ZTA rises above chance),
tools/train_selector.py (bit-identical --resume after SIGKILL; its PromptTunner.pt loaded by the official
PromptTunnerModel, rebuilt here from modules/prompt.py, scores alike; refusals as one line) and
tools/eval_selector.py (its table and JSON). Corpus and metrics: test_instructions.py, test_selector_eval.py.

    python -m pytest tests/test_selector_training.py -q -s          (about 20-40 s on 2 CPU cores)
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import assert_close
from minidiff.train import instructions as ins, selector_training as st
from minidiff.plugin.plugin import TASKS
from minidiff.plugin.files import export_official_selector
from minidiff.plugin.fake import fake_models
from minidiff.plugin.selector import PluginSelector
from minidiff.eval.selector_eval import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eq6_against_loops():
    torch.manual_seed(0)
    sel = PluginSelector(6)
    visual, text = torch.randn(3, 6), torch.randn(3, 4, 6)
    photo_tasks = ["derain", "face", "derain"]
    text_tasks = [[("derain",), ("face",), (), ("dehaze", "face")],
                  [("derain", "face"), ("derain",), ("derain",), ("dehaze",)],
                  [("derain", "dehaze"), ("derain",), ("face",), ("lowlight",)]]  # text 1: same task -> out
    keep = st.indicator(photo_tasks, text_tasks)
    loss, cos = st.batch_loss(sel, visual, text, keep)
    tau = 1 / math.exp(sel.logit_scale.item())
    with torch.no_grad():
        v, q = sel.proj_v(visual), sel.proj_t(text)
    total = 0.0
    for i in range(3):
        sim = [float(v[i] @ q[i, k] / (v[i].norm() * q[i, k].norm())) for k in range(4)]
        denominator = sum(math.exp(sim[k] / tau) for k in range(4) if photo_tasks[i] not in text_tasks[i][k])
        total += -math.log(math.exp(sim[0] / tau) / denominator)
        assert_close(cos[i], torch.tensor(sim), 1e-6, f"cos row {i}")  # fp32 dot products
    assert_close(loss, torch.tensor(total / 3), 1e-5, "eq. 6")  # fp32 logsumexp vs float64 loop
    loss.backward()
    assert sel.logit_scale.grad is not None and sel.proj_v.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):  # a photo without any text of another task
        st.contrastive_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                            torch.zeros(1, 2, dtype=torch.bool))


def test_draw_batch():
    texts = st.training_texts(ins.load_corpus().part("train"), seed=0)
    per_task = [[2 * c, 2 * c + 1] for c in range(len(TASKS))]
    b = st.draw_batch(3, 17, per_task, texts, 8, 7)
    again = st.draw_batch(3, 17, per_task, texts, 8, 7)
    assert all(torch.equal(x, y) for x, y in zip(vars(b).values(), vars(again).values()))
    assert not torch.equal(b.texts, st.draw_batch(3, 18, per_task, texts, 8, 7).texts)
    for photo, c, row, keep in zip(b.photos, b.tasks, b.texts, b.indicator):
        task = TASKS[c]
        assert int(photo) in per_task[c] and task in texts.texts[row[0]][1]  # the positive names the task
        assert all(task not in texts.texts[k][1] for k in row[1:]) and len(set(row.tolist())) == 8
        assert keep.tolist() == [False] + [True] * 7


def test_learning_tiny_networks():
    # Three tasks, single-task sentences (with three tasks nearly every random combination names two or all
    # three of them, which leaves little to learn in 600 steps); irrelevant sentences stay negatives.
    tasks = ["derain", "lowlight", "face"]
    corpus = ins.load_corpus().restrict(tasks)
    corpus = ins.Corpus(corpus.single, (), corpus.irrelevant)
    texts = st.training_texts(corpus.part("train"), seed=0, combinations=0)
    held_out = [(s, (t,)) for t, v in corpus.part("test").single.items() for s in v]
    models = fake_models(tasks, with_selector=False)
    names = ("text", "photos")
    feats, per_task, text_feats = st.frozen_features(models, st.fake_photos(tasks, 4, 0), [
        t for t, _ in texts.texts + held_out], None, names, progress=False)
    eval_feats, eval_per_task, _ = st.frozen_features(models, st.fake_photos(tasks, 2, 1), [], None, names,
                                                      progress=False)
    table = torch.stack([text_feats[t] for t, _ in texts.texts])
    torch.manual_seed(0)
    sel = PluginSelector(table.shape[-1])
    before = evaluate(sel, {"s": held_out}, text_feats, eval_feats, eval_per_task, tasks)["s"]
    optimizer = torch.optim.AdamW(sel.parameters(), lr=1e-3)
    losses = []
    for step in range(1, 601):
        b = st.draw_batch(0, step, per_task, texts, 32, 7)
        loss, _ = st.batch_loss(sel, feats[b.photos, b.tasks], table[b.texts], b.indicator)
        st.update(sel, optimizer, loss)
        losses.append(loss.item())
    after = evaluate(sel, {"s": held_out}, text_feats, eval_feats, eval_per_task, tasks)["s"]
    print(f"held-out single-task ({len(held_out)} sentences): ZTA {before['ZTA']:.3f} -> {after['ZTA']:.3f}, "
          f"mAP {before['mAP']:.3f} -> {after['mAP']:.3f}; loss {np.mean(losses[:100]):.3f} -> "
          f"{np.mean(losses[-100:]):.3f}")
    assert np.mean(losses[-100:]) < np.mean(losses[:100]) - 1.0
    # chance: an untrained selector gets ~0 (it must get all three signs right); picking one task at random
    # would get 1/3. Trained on random tiny text features, the held-out sentences reach ~0.55.
    assert before["ZTA"] < 0.2 and after["ZTA"] > 1 / 3 + 0.08 and after["mAP"] > before["mAP"] + 0.15


class PromptTunnerModel(nn.Module):
    """modules/prompt.py of yuhaoliu7456/Diff-Plugin @ 79e12bb, copied (visual branch; the unused text branch
    q/k/v/out_conv exists only when tunner_for_visual is False). `width` is 768 in the official file."""

    def __init__(self, args=None, width=768):
        super().__init__()
        self.args = args
        self.proj_v = nn.Linear(width, width)
        self.proj_t = nn.Linear(width, width)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def forward(self, clip_t, plug_in_embeddings):
        bsz = plug_in_embeddings.shape[0]
        plug_in_embeddings = plug_in_embeddings.permute(0, 2, 1)
        plug_in_embeddings = F.max_pool1d(plug_in_embeddings, kernel_size=plug_in_embeddings.size(2))
        plug_in_embeddings = plug_in_embeddings.permute(0, 2, 1)
        vis = self.proj_v(plug_in_embeddings)
        norm_vis = vis / vis.norm(dim=-1, keepdim=True)
        text = self.proj_t(clip_t).squeeze(1)
        text = text.unsqueeze(0).repeat(bsz, 1, 1)
        norm_text = text / text.norm(dim=-1, keepdim=True)
        score = torch.bmm(norm_vis, norm_text.transpose(1, 2)).squeeze(1)
        return self.logit_scale.exp() * score


def official_scores(path, width, ours):
    """Load `path` as demo.py l.85-90 does (strict) and compare its scores with minidiff's selector."""
    official = PromptTunnerModel(SimpleNamespace(tunner_for_visual=True), width)
    official.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    torch.manual_seed(1)
    tokens, text = torch.randn(9, 256, width), torch.randn(1, 1, width)  # 8 plugins + null, one prompt
    with torch.no_grad():
        expected = official(text, tokens)[:, 0]  # [9]
        got = ours(tokens.amax(dim=1), text[0])  # PluginSelector: visual [9, D] max-pooled, text [1, D]
    assert_close(got, expected, 1e-6, f"official scores, width {width}")  # fp32, same ops in another order


def test_export_official_published_shapes(tmp_path):
    torch.manual_seed(0)
    sel = PluginSelector(768)
    with torch.no_grad():
        sel.logit_scale.fill_(3.1)  # not the init value: the file must carry it
    export_official_selector(sel, tmp_path / "PromptTunner.pt")
    official_scores(tmp_path / "PromptTunner.pt", 768, sel)


def load_tool(name):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    tool = module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def write_photos(folder, tasks, per_task, seed):
    for task, images in st.fake_photos(tasks, per_task, seed).items():
        os.makedirs(folder / task)
        for k, im in enumerate(images):
            im.save(folder / task / f"{k}.png")


def train_args(out, images, cache, steps, *extra):
    return ["--fake-weights", "--images", str(images), "--cache", str(cache), "--output", str(out),
            "--steps", str(steps), "--checkpoint-every", "20", "--lr", "1e-3", "--export-official", *extra]


def test_train_resume_after_sigkill_export_and_eval(tmp_path, capsys):
    train, evaluate_tool = load_tool("train_selector"), load_tool("eval_selector")
    tasks = ["derain", "dehaze", "face"]
    write_photos(tmp_path / "images", tasks, 3, 0)
    write_photos(tmp_path / "val", tasks, 2, 1)
    ref, run, cache = tmp_path / "ref", tmp_path / "run", tmp_path / "cache"
    assert train.main(train_args(ref, tmp_path / "images", cache, 300)) == 0  # uninterrupted; fills the cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "train_selector.py"),
                             *train_args(run, tmp_path / "images", cache, 100000)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-000040").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # anywhere: mid-step, mid-checkpoint, mid-log
    proc.wait()
    latest = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert 40 <= latest < 300, latest
    capsys.readouterr()
    assert train.main(train_args(run, tmp_path / "images", cache, 300, "--resume")) == 0
    assert f"resuming from {run / 'checkpoints' / f'step-{latest:06d}'}" in capsys.readouterr().out
    a, b = load_file(ref / "selector.safetensors"), load_file(run / "selector.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert (ref / "log.csv").read_text() == (run / "log.csv").read_text()
    assert (run / "loss.png").exists() and json.loads((run / "config.json").read_text())["kind"] == "selector"
    # the official PromptTunnerModel (at the fake networks' width) loads the export and scores alike
    ours = PluginSelector(a["proj_v.weight"].shape[0])
    ours.load_state_dict(a)
    official_scores(run / "PromptTunner.pt", ours.proj_v.in_features, ours)
    # a second run in the same folder without --resume is refused before any work (exit 2, one line)
    assert train.main(train_args(run, tmp_path / "images", cache, 300)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and err.count("\n") == 1
    # evaluation on the held-out corpus part, paired with the val photos: the table and the JSON
    assert evaluate_tool.main(["--fake-weights", "--selector", str(run / "selector.safetensors"), "--images",
                               str(tmp_path / "val"), "--cache", str(cache), "--json",
                               str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    print(out)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["tasks"] == tasks
    assert list(record["settings"]) == ["single-task", "multi-task", "single+non"]
    for name, r in record["settings"].items():
        assert name in out and r["requests"] > 0 and all(0 <= r[k] <= 1 for k in ("ZTA", "mAP", "CF1", "OF1"))


def test_bad_input_is_one_line(tmp_path, capsys):
    tool = load_tool("train_selector")
    (tmp_path / "images" / "colorize").mkdir(parents=True)
    cases = [(["--negatives", "0"], "train_selector.py: error: argument --negatives: must be at least 1"),
             (["--images", str(tmp_path / "images")], "no corpus sentences for colorize"),
             (["--images", str(tmp_path / "nowhere")], "not a folder")]
    for extra, message in cases:
        try:  # a value the parser refuses exits there (SystemExit 2), a refused run returns 2
            rc = tool.main(["--fake-weights", "--output", str(tmp_path / "out"), *extra])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
