"""Tests of the selector losses of minidiff/train/selector_training.py (decoupled, infonce, supcon, sigmoid)
against loop-by-loop float64 computations, the masking of same-task texts on batches with repeated tasks,
logit_scale kept out of weight decay, and why the `null` entry needs no training (its score never changes
what runs, in the official demo's rule or in minidiff's).

    python -m pytest tests/test_selector_losses.py -q -s          (a few seconds)
"""
import math

import pytest
import torch

from helpers import assert_close
from minidiff.train import instructions as ins, selector_training as st
from minidiff.plugin import selector as selector_mod
from minidiff.plugin.fake import fake_models
from minidiff.plugin.plugin import TASKS
from minidiff.plugin.selector import NULL, PluginSelector, chosen_by_scores

# photos 0 and 2 share a task: the batch has repeated tasks, so infonce must mask and supcon must count
PHOTO_TASKS = ["derain", "face", "derain"]
ROW_TASKS = [[("derain",), ("face",), ()],  # photo 0: positive, then negatives (text 1 names photo 1's task)
             [("face", "dehaze"), ("derain",), ("lowlight",)],  # text 4 names photos 0 and 2's task
             [("derain", "face"), ("dehaze",), ("face",)]]  # text 6 names photo 1's task too


def tiny_batch():
    torch.manual_seed(0)
    sel = PluginSelector(6)
    with torch.no_grad():
        sel.logit_scale.fill_(math.log(5.0))  # 1/tau = 5, so the loops below test the temperature too
    visual, text = torch.randn(3, 6), torch.randn(3, 3, 6)
    keep = st.indicator(PHOTO_TASKS, ROW_TASKS)  # [3, 3]
    flat = [t for row in ROW_TASKS for t in row]  # the 9 texts of the batch, row-major
    same = ~st.indicator(PHOTO_TASKS, [flat] * 3)  # [3, 9]
    return sel, visual, text, keep, same, flat


def loop_cosines(sel, visual, text):
    """cos[i][m] in float64 for photo i and text m of the flattened batch."""
    with torch.no_grad():
        v, q = sel.proj_v(visual).double(), sel.proj_t(text.reshape(-1, text.shape[-1])).double()
    return [[float(v[i] @ q[m] / (v[i].norm() * q[m].norm())) for m in range(len(q))] for i in range(len(v))]


def test_same_mask_of_a_repeated_task_batch():
    _, _, _, keep, same, _ = tiny_batch()
    assert keep.tolist() == [[False, True, True], [False, True, True], [False, True, True]]
    assert same.tolist() == [[1, 0, 0, 0, 1, 0, 1, 0, 0],
                             [0, 1, 0, 1, 0, 0, 1, 0, 1],
                             [1, 0, 0, 0, 1, 0, 1, 0, 0]]
    # each photo's own block of `same` is the complement of eq. 6's indicator
    assert all(same[i, 3 * i:3 * i + 3].tolist() == (~keep[i]).tolist() for i in range(3))


def test_decoupled_infonce_supcon_against_loops():
    sel, visual, text, keep, same, flat = tiny_batch()
    cos = loop_cosines(sel, visual, text)
    s = [[5.0 * c for c in row] for row in cos]  # s_im = cos / tau
    decoupled = infonce = supcon = 0.0
    for i in range(3):
        pos = 3 * i  # photo i's positive is the first of its 3 texts
        # decoupled: own texts only, the indicator drops every text naming the task (the positive too)
        den = sum(math.exp(s[i][3 * i + k]) for k in range(3) if PHOTO_TASKS[i] not in ROW_TASKS[i][k])
        decoupled += -(s[i][pos] - math.log(den))
        # infonce: all 9 texts; kept = own positive + texts not naming the photo's task
        den = sum(math.exp(s[i][m]) for m in range(9) if m == pos or PHOTO_TASKS[i] not in flat[m])
        infonce += -(s[i][pos] - math.log(den))
        # supcon: all 9 texts in the denominator; positives = every text naming the task
        den = sum(math.exp(s[i][m]) for m in range(9))
        positives = [m for m in range(9) if PHOTO_TASKS[i] in flat[m]]
        supcon += -sum(s[i][p] - math.log(den) for p in positives) / len(positives)
    expected = {"decoupled": decoupled / 3, "infonce": infonce / 3, "supcon": supcon / 3}
    print({k: round(v, 6) for k, v in expected.items()})
    own = torch.tensor([[cos[i][3 * i + k] for k in range(3)] for i in range(3)])
    for name, value in expected.items():
        loss, row_cos = st.batch_loss(sel, visual, text, keep, name, same)
        assert_close(loss, torch.tensor(value), 1e-5, name)  # fp32 logsumexp vs float64 loop
        assert_close(row_cos, own, 1e-6, f"{name} cos")  # the log's cosines: each photo's own texts
        sel.zero_grad()
        loss.backward()
        assert sel.logit_scale.grad is not None and sel.proj_t.weight.grad.abs().sum() > 0
    # the three readings really differ on this batch
    assert min(abs(decoupled - infonce), abs(infonce - supcon), abs(decoupled - supcon)) > 1e-2


def test_sigmoid_against_a_loop():
    # every plugin's row of every photo against every text of the batch, label "the text asks for it"
    sel, _, text, keep, _, flat = tiny_batch()
    plugins = ["derain", "face", "dehaze", "lowlight"]
    visual = torch.randn(3, len(plugins), 6, generator=torch.Generator().manual_seed(2))  # [B, P, D]
    asks = torch.tensor([[p in tasks for p in plugins] for tasks in flat])  # [9, P]
    own_plugin = torch.tensor([plugins.index(t) for t in PHOTO_TASKS])  # [B]
    expected, own = 0.0, [[0.0] * 3 for _ in range(3)]
    for p in range(len(plugins)):
        cos = loop_cosines(sel, visual[:, p], text)  # [3][9] in float64
        for i in range(3):
            for m in range(9):
                s_ = 5.0 * cos[i][m]
                expected -= math.log(1 / (1 + math.exp(-s_))) if plugins[p] in flat[m] else \
                    math.log(1 / (1 + math.exp(s_)))
                if p == own_plugin[i] and m // 3 == i:
                    own[i][m % 3] = cos[i][m]
    expected /= 3 * len(plugins) * 9
    loss, row_cos = st.batch_loss(sel, visual, text, keep, "sigmoid", asks=asks, tasks=own_plugin)
    print(f"sigmoid {expected:.6f}")
    assert_close(loss, torch.tensor(expected), 1e-6, "sigmoid")
    assert_close(row_cos, torch.tensor(own), 1e-6, "sigmoid cos")
    loss.backward()
    assert sel.logit_scale.grad is not None and sel.proj_v.weight.grad.abs().sum() > 0
    # the score's sign is the decision: a text asking for a plugin is pushed above 0, the others below
    scores = torch.zeros(1, len(plugins), 9, requires_grad=True)
    st.sigmoid_loss(scores, asks).backward()
    assert ((scores.grad[0] < 0) == asks.T).all()


def test_masking_on_repeated_tasks():
    _, _, _, _, same, _ = tiny_batch()
    positive = torch.tensor([0, 3, 6])
    # all scores equal: infonce = log(#kept), supcon = log(#texts), whatever the number of positives
    zero = torch.zeros(3, 9)
    kept = [1 + int((~same[i]).sum()) for i in range(3)]  # own positive + texts of other tasks
    assert kept == [7, 6, 7]
    assert_close(st.infonce_loss(zero, positive, same), torch.tensor(sum(map(math.log, kept)) / 3), 1e-7,
                 "infonce, equal scores")
    assert_close(st.supcon_loss(zero, same), torch.tensor(math.log(9)), 1e-7, "supcon, equal scores")
    # a false negative (another photo's text of the same task) moves neither infonce's value nor gets a
    # gradient; supcon pulls it up like a positive (negative gradient), and pushes a real negative down
    scores = torch.randn(3, 9, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = st.infonce_loss(scores, positive, same)
    loss.backward()
    false_neg = (0, 4)  # photo 0 (derain) vs text 4 ("derain", photo 1's negative)
    assert same[false_neg] and scores.grad[false_neg] == 0 and scores.grad[0, 6] == 0  # text 6 names derain
    bumped = scores.detach().clone()
    bumped[false_neg] += 10.0
    assert st.infonce_loss(bumped, positive, same) == loss.detach()
    scores.grad = None
    st.supcon_loss(scores, same).backward()
    assert scores.grad[false_neg] < 0 and scores.grad[0, 1] > 0  # text 1 ("face") is a real negative
    # the decoupled form on the same rows: each photo's own positive is out of its denominator
    keep = ~same.view(3, 3, 3)[range(3), range(3)]  # [3, 3]
    assert not keep[:, 0].any()


def test_draw_batch_same_covers_the_whole_batch():
    texts = st.training_texts(ins.load_corpus().part("train"), seed=0)
    per_task = [[c] for c in range(len(TASKS))]
    b = st.draw_batch(0, 5, per_task, texts, 16, 7)  # 16 photos over 8 tasks: tasks repeat
    assert b.same.shape == (16, 16 * 8)
    flat = b.texts.reshape(-1).tolist()
    for i, c in enumerate(b.tasks.tolist()):
        assert b.same[i].tolist() == [TASKS[c] in texts.texts[m][1] for m in flat]
        assert b.same[i, 8 * i:8 * i + 8].tolist() == (~b.indicator[i]).tolist()
    assert b.asks.tolist() == [[t in texts.texts[m][1] for t in TASKS] for m in flat]  # sigmoid's labels
    repeated = [i for i in range(16) if (b.tasks == b.tasks[i]).sum() > 1]
    assert repeated and all(b.same[i].sum() > 1 for i in repeated)  # other photos' positives are "same"


def test_logit_scale_out_of_weight_decay():
    torch.manual_seed(0)
    sel = PluginSelector(4)
    opt = st.make_optimizer(sel, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [st.WEIGHT_DECAY, 0.0]
    assert opt.param_groups[1]["params"] == [sel.logit_scale]
    assert len(opt.param_groups[0]["params"]) == 4  # proj_v and proj_t, weight and bias
    before = {k: v.detach().clone() for k, v in sel.named_parameters()}
    for p in sel.parameters():  # zero gradients: AdamW's step is then the decay alone
        p.grad = torch.zeros_like(p)
    opt.step()
    assert sel.logit_scale.item() == before["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    factor = 1 - 0.1 * st.WEIGHT_DECAY  # AdamW: p <- p (1 - lr wd) before the (here zero) Adam update
    for name in ("proj_v.weight", "proj_t.bias"):
        assert_close(dict(sel.named_parameters())[name], before[name] * factor, 1e-7, name)
    # a plain AdamW would have decayed it
    plain = torch.optim.AdamW([sel.logit_scale], lr=0.1)
    sel.logit_scale.grad = torch.zeros(())
    plain.step()
    assert_close(sel.logit_scale, torch.tensor(math.log(1 / 0.07) * factor), 1e-7, "plain AdamW")


def official_demo_selection(scores):
    """demo.py l.145-160 restated: [T + 1] scores, null last -> selected indices. Negatives become 0; when no
    entry (null included) is positive, null's becomes 1; selected = entries above 0, in index order."""
    s = [max(v, 0.0) for v in scores]
    if not any(v > 0 for v in s):
        s[-1] = 1.0
    return [k for k, v in enumerate(s) if v > 0]


def test_null_score_never_changes_the_plugins_that_run():
    # Why the null entry needs no training: in the official demo null is index 8, selected last, and its
    # "plugin" returns the current image (l.184-186), so whatever its score the same real plugins run in the
    # same order and the output is the same; minidiff's chosen_by_scores ignores it outright.
    g = torch.Generator().manual_seed(0)
    names = list(TASKS)
    for _ in range(200):
        real = (torch.randn(len(TASKS), generator=g) * 2).tolist()
        runs = set()
        for null in (-3.0, 0.0, 0.5, 3.0):
            picked = official_demo_selection(real + [null])
            real_picked = [names[k] for k in picked if k < len(TASKS)]
            assert picked[:len(real_picked)] == [names.index(t) for t in real_picked]  # null, if any, last
            ours = chosen_by_scores(dict(zip(names + [NULL], real + [null])))
            assert real_picked == ours
            runs.add(tuple(ours))
        assert len(runs) == 1


def test_select_is_independent_of_the_null_embedding(monkeypatch):
    from PIL import Image
    tasks = ["derain", "dehaze", "face"]
    m = fake_models(tasks)
    photo = Image.new("RGB", (64, 64), (120, 80, 40))
    base_tasks, base = selector_mod.select(m.selector, m.sd, m.clip_vision, m.plugins, photo, "remove rain")
    nulls = {base[NULL]}
    for text in ("remove rain", "nothing at all", "x"):  # other texts as the null embedding: other scores
        monkeypatch.setattr(selector_mod, "NULL_TEXT", text)
        chosen, s = selector_mod.select(m.selector, m.sd, m.clip_vision, m.plugins, photo, "remove rain")
        assert chosen == base_tasks and {k: v for k, v in s.items() if k != NULL} == {
            k: v for k, v in base.items() if k != NULL}
        nulls.add(s[NULL])
    assert len(nulls) == 4  # the null score did change each time


def test_train_selector_flag_matches_the_library():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train_selector.py")
    spec = importlib.util.spec_from_file_location("train_selector_for_loss_test", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_args(["--output", "x"]).loss == st.DEFAULT_LOSS == "sigmoid"
    assert tool.parse_args(["--output", "x", "--loss", "infonce"]).loss == "infonce"
    assert "loss" in tool.FIXED  # --resume refuses to switch the loss mid-run
    with pytest.raises(SystemExit):
        tool.parse_args(["--output", "x", "--loss", "clip"])


@pytest.mark.parametrize("loss", ["infonce", "supcon", "sigmoid"])
def test_in_batch_losses_learn_on_tiny_networks(loss):
    # test_selector_training.py's learning test for the decoupled loss, here for the in-batch ones:
    # 3 tasks, single-task sentences, batch 32, 300 steps at lr 1e-3 through make_optimizer.
    import numpy as np
    from minidiff.eval.selector_eval import evaluate
    tasks = ["derain", "lowlight", "face"]
    corpus = ins.load_corpus().restrict(tasks)
    corpus = ins.Corpus(corpus.single, (), corpus.irrelevant)
    texts = st.training_texts(corpus.part("train"), seed=0, combinations=0)
    held_out = [(s, (t,)) for t, v in corpus.part("test").single.items() for s in v]
    models = fake_models(tasks, with_selector=False)
    feats, per_task, text_feats = st.frozen_features(models, st.fake_photos(tasks, 4, 0), [
        t for t, _ in texts.texts + held_out], None, ("text", "photos"), progress=False)
    eval_feats, eval_per_task, _ = st.frozen_features(models, st.fake_photos(tasks, 2, 1), [], None,
                                                      ("text", "photos"), progress=False)
    table = torch.stack([text_feats[t] for t, _ in texts.texts])
    torch.manual_seed(0)
    sel = PluginSelector(table.shape[-1])
    before = evaluate(sel, {"s": held_out}, text_feats, eval_feats, eval_per_task, tasks)["s"]
    optimizer = st.make_optimizer(sel, 1e-3)
    losses = []
    for step in range(1, 301):
        b = st.draw_batch(0, step, per_task, texts, 32, 7)
        visual = feats[b.photos] if loss == "sigmoid" else feats[b.photos, b.tasks]  # [B, P, D] / [B, D]
        value, _ = st.batch_loss(sel, visual, table[b.texts], b.indicator, loss, b.same, b.asks, b.tasks)
        st.update(sel, optimizer, value)
        losses.append(value.item())
    after = evaluate(sel, {"s": held_out}, text_feats, eval_feats, eval_per_task, tasks)["s"]
    print(f"{loss}: loss {np.mean(losses[:50]):.3f} -> {np.mean(losses[-50:]):.3f}, held-out single-task "
          f"mAP {before['mAP']:.3f} -> {after['mAP']:.3f}, ZTA {before['ZTA']:.3f} -> {after['ZTA']:.3f}")
    # measured: infonce 5.21 -> 2.94, supcon 5.38 -> 4.43; mAP 0.387 -> 0.765 for both;
    # sigmoid (a mean binary cross-entropy, on another scale) 0.474 -> 0.206
    assert np.mean(losses[-50:]) < (np.mean(losses[:50]) / 2 if loss == "sigmoid" else np.mean(losses[:50]) - 0.5)
    assert after["mAP"] > before["mAP"] + 0.3
    if loss != "supcon":  # measured infonce 0.54, sigmoid 0.52 (supcon: 0.04, every task above theta = 0)
        assert after["ZTA"] > 1 / 3 + 0.08


def test_ablation_summary_and_winner(tmp_path):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench",
                        "selector_ablation.py")
    spec = importlib.util.spec_from_file_location("selector_ablation_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def run(zta, m_ap, cf1):
        return {"settings": {s: {"ZTA": zta, "mAP": m_ap, "CF1": cf1} for s in bench.SETTINGS}}
    runs = {"decoupled": [run(0.5, 0.5, 0.5), run(0.3, 0.5, 0.5)],  # mean of the cells 0.4667
            "infonce": [run(0.0, 0.9, 0.4), run(0.0, 0.7, 0.4)],  # 0.4
            "supcon": [run(0.2, 0.6, None), run(0.2, 0.6, None)]}  # an undefined metric (null) -> NaN
    table, winner, score = bench.summarize(runs, list(runs))
    assert table["decoupled"]["single-task"]["ZTA"] == (pytest.approx(0.4), pytest.approx(math.sqrt(0.02)))
    assert score["decoupled"] == pytest.approx(1.4 / 3) and score["infonce"] == pytest.approx(0.4)
    assert math.isnan(score["supcon"]) and winner == "decoupled"  # NaN never wins
    args = bench.parse_args(["--output", str(tmp_path), "--fake-weights"])
    text = bench.markdown(table, winner, score, args, {k: [["a"], ["b"]] for k in runs})
    assert "| decoupled (best) | 0.400 ± 0.141 | 0.500 ± 0.000 |" in text and "Winner" in text
    with pytest.raises(SystemExit, match="error: without --fake-weights"):
        bench.main(["--output", str(tmp_path)])
