"""Training the Diff-Plugin Plugin-Selector: the contrastive objective (eq. 6), batch assembly, and the
frozen features it trains on (with an on-disk cache).

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024),
sec. 3.4 (eq. 4-6) and sec. 4 (batch 8, N = 7 negatives, AdamW at lr 1e-5, prompts combined across tasks).
Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, modules/prompt.py (PromptTunnerModel, visual variant) and
demo.py (how scores are made at inference). The official training code was never released; what follows
is eq. 6 as printed, with the choices below written out.

What trains: the selector's visual head VP (`proj_v`), textual head TP (`proj_t`) and its `logit_scale`
(an nn.Parameter in the official model; 1/tau = exp(logit_scale)). Frozen: CLIP vision and text, the plugins.
The visual pseudo-label of photo i of task c_i (sec. 3.4: "we adopt F^p_i as the pseudo label") is the
max over the 256 TPB tokens of plugin c_i on that photo, as minidiff.plugin.selector.scores makes it at inference.

One batch: B photos (task drawn uniformly, then a photo of it), each with one positive instruction (a
single-task sentence of its task, or, half the time, a multi-task one naming it) and N negatives drawn from
the training sentences that do not name its task (other tasks' singles, multi-task sentences without it,
irrelevant sentences). For photo i and its texts k = 1 ... N+1 (k = j the positive):

    s_ik   = exp(logit_scale) * cos(VP(F^p_i), TP(Enc_T(text_k)))                    [B, N+1]
    l_i,j  = -log( exp(s_ij) / sum_k 1[c_i not in tasks(k)] exp(s_ik) )  (eq. 6)     loss = mean over i

Three readings of the indicator, and one objective aimed at the selection rule (`loss=`, train_selector.py
--loss):

  decoupled  eq. 6 literally, per photo over its own N+1 texts: the indicator removes every text naming the
             photo's task, the positive included, so the denominator holds the negatives only ("decoupled"
             contrastive loss). A text naming several tasks counts as "same task" for each of them.
  infonce    eq. 6 as SimCLR's eq. 1 with the batch as negatives (the footnote ties N = 7 to batch 8; the
             official PromptTunnerModel scores B photos against T shared texts): each photo against all
             B(N+1) texts of the batch [B, B(N+1)], the positive kept in the denominator as in CLIP, and the
             indicator masking other photos' texts of the same task (false negatives).
  supcon     multi-positive SupCon (Khosla et al. 2020, L_out) over the same [B, B(N+1)] scores: every text
             of the batch naming the photo's task is a positive, averaged in log-probability.
  sigmoid    not eq. 6: the rule that selects (a plugin runs when its score is > 0, demo.py) trained directly.
             Every plugin's row of each photo (not only its pseudo-label's) against every text of the batch
             [B, P, B(N+1)], a binary label per pair (does text m ask for plugin p?), binary cross-entropy on the
             score s itself (no bias: the threshold stays 0), as SigLIP (Zhai et al. 2023) trains CLIP pairs.
             The softmax readings only rank a photo's positive text above its negatives, so neither the zero
             of s nor the rows of the other plugins on the same photo (which the demo scores too) are ever
             trained. On the small family it wins the ablation (README "Which loss"; shipped selector:
             held-out single-task ZTA 0.810, the infonce one before it 0.599).

logit_scale is clamped to [0, ln 100] after each update, as CLIP does (the decoupled loss keeps rewarding a
larger scale once positives beat negatives), and make_optimizer keeps it out of AdamW's weight decay.

    texts = training_texts(load_corpus().part("train").restrict(tasks), seed=0)
    batch = draw_batch(seed, step, photos_per_task, texts, batch=8, negatives=7)
    optimizer = make_optimizer(selector, lr=1e-5)
    loss, cos = batch_loss(selector, visual[batch.photos, batch.tasks], text_feats[batch.texts],
                           batch.indicator, loss="infonce", same=batch.same)
    update(selector, optimizer, loss)
"""
import hashlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minidiff.io.files import atomic_write, sha256_file
from minidiff.train.instructions import combine
from minidiff.plugin.plugin import clip_features
from minidiff.plugin.selector import text_embedding
from minidiff.train.seeding import generator_for

TRAIN_COMBINATIONS = 1000  # random multi-task requests drawn once from the training sentences (sec. 4)
MULTI_POSITIVE_SHARE = 0.5  # share of positives drawn from multi-task requests naming the photo's task
MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp on the learned temperature (1/tau <= 100)
LOSSES = ("decoupled", "infonce", "supcon", "sigmoid")  # readings of eq. 6 (module docstring; train_selector.py --loss)
DEFAULT_LOSS = "sigmoid"  # chosen by the ablation on the small family in README (tools/bench/selector_ablation.py)
WEIGHT_DECAY = 0.01  # AdamW's default (the paper: "default parameters"), on proj_v / proj_t only
TEXT_CHUNK = 256  # sentences per text-encoder call (and per cache shard)
PHOTO_CHUNK = 256  # photos per cache shard (a kill loses at most one shard of work)


# ---------------------------------------------------------------------------------------------------------
# The objective (eq. 4-6)
# ---------------------------------------------------------------------------------------------------------

def pair_scores(selector, visual, text):
    """exp(logit_scale) * cos(VP(visual), TP(text)): visual [B, D], text [B, K, D] -> [B, K].
    The same numbers as PluginSelector.forward (one text, many visual rows) for every pair."""
    v = F.normalize(selector.proj_v(visual), dim=-1)  # [B, D], unit length
    q = F.normalize(selector.proj_t(text), dim=-1)  # [B, K, D]
    return selector.logit_scale.exp() * torch.einsum("bd,bkd->bk", v, q)  # [B, K]


def batch_scores(selector, visual, text):
    """exp(logit_scale) * cos of every photo row with every text: visual [B, D] (or [B, P, D]: every plugin's
    row of each photo), text [M, D] -> [B, M] (or [B, P, M])."""
    v = F.normalize(selector.proj_v(visual), dim=-1)  # [B, (P,) D]
    q = F.normalize(selector.proj_t(text), dim=-1)  # [M, D]
    return selector.logit_scale.exp() * v @ q.T  # [B, (P,) M]


def indicator(photo_tasks, text_tasks):
    """1[c_i not in tasks(k)] of eq. 6: photo_tasks [B] task names, text_tasks [B][K] task tuples
    -> bool [B, K]."""
    return torch.tensor([[c not in tasks for tasks in row] for c, row in zip(photo_tasks, text_tasks)])


def contrastive_loss(scores, positive, keep):
    """The "decoupled" loss, eq. 6 read literally, averaged over the batch: scores [B, K] (already divided by
    tau), positive [B] (the index j of each row's positive text), keep [B, K] bool (the indicator) -> 0-d.
    The denominator holds the kept texts only; with keep = the indicator that is the negatives only."""
    if not bool(keep.any(dim=1).all()):
        raise ValueError("eq. 6: a photo has no text of another task in its denominator")
    pos = scores.gather(1, positive[:, None])[:, 0]  # [B]: s_ij
    neg = scores.masked_fill(~keep, float("-inf")).logsumexp(dim=1)  # [B]: log sum_k 1[...] exp(s_ik)
    return (neg - pos).mean()


def infonce_loss(scores, positive, same):
    """CLIP / SimCLR InfoNCE over the texts of the whole batch, averaged over the photos.

    scores [B, M]: photo i against every text m of the batch (already divided by tau); positive [B]: the
    column of photo i's own positive; same [B, M] bool: text m names photo i's task. The denominator holds the
    positive and every text NOT naming the photo's task: other photos' texts of the same task (false
    negatives) are masked out, which is the job this reading gives eq. 6's indicator.
        l_i = -s_i,pos(i) + log sum_m [m == pos(i) or not same_im] exp(s_im)
    """
    rows = torch.arange(len(scores), device=scores.device)  # [B]
    keep = ~same  # [B, M]: texts of other tasks
    keep = keep.index_put((rows, positive), torch.ones_like(positive, dtype=torch.bool))  # + own positive
    pos = scores[rows, positive]  # [B]
    return (scores.masked_fill(~keep, float("-inf")).logsumexp(dim=1) - pos).mean()


def supcon_loss(scores, same):
    """Multi-positive supervised contrastive loss (Khosla et al. 2020, eq. 2, L_out) with photos as anchors
    and the batch's texts as the contrasted set, averaged over the photos.

    scores [B, M] (already divided by tau); same [B, M] bool: the positives P(i) of photo i are every text
    naming its task (its own positive, other photos' same-task texts, multi-task texts naming it). The
    anchor is a photo, not a text, so the denominator holds all M texts (no self-contrast to remove).
        l_i = -1/|P(i)| sum_{p in P(i)} ( s_ip - log sum_m exp(s_im) )
    """
    if not bool(same.any(dim=1).all()):
        raise ValueError("supcon: a photo has no text of its task in the batch")
    log_prob = scores - scores.logsumexp(dim=1, keepdim=True)  # [B, M]: log softmax over the texts
    return (-(log_prob * same).sum(dim=1) / same.sum(dim=1)).mean()


def sigmoid_loss(scores, asks):
    """Binary cross-entropy of every (photo, plugin, text) triple on its selection score: scores [B, P, M]
    (exp(logit_scale) * cos, the score the demo thresholds at 0), asks [M, P] bool: text m asks for plugin p.
        l = mean over b, p, m of  -[asks_mp] log sigmoid(s_bpm) - [not asks_mp] log sigmoid(-s_bpm)
    """
    target = asks.T.to(scores.dtype).expand_as(scores)  # [B, P, M]
    return F.binary_cross_entropy_with_logits(scores, target)


def batch_loss(selector, visual, text, keep, loss="decoupled", same=None, asks=None, tasks=None):
    """One batch's loss: visual [B, D] pseudo-labels, text [B, K, D] pooled text embeddings (each photo's
    K = 1 + N texts, the positive first), keep [B, K] eq. 6's indicator -> (loss, cosines [B, K] for the log).

    loss "decoupled": eq. 6 read literally, each photo against its own K texts (contrastive_loss).
    "infonce" / "supcon": each photo against all B * K texts of the batch (infonce_loss / supcon_loss);
    they need same [B, B * K] bool, text m (in row-major order of `text`) names photo i's task.
    "sigmoid": visual is [B, P, D], every plugin's row of each photo; asks [B * K, P] bool (text m asks for
    plugin p), tasks [B] (the index of each photo's own plugin, for the logged cosines) (sigmoid_loss).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
    scale = selector.logit_scale.detach().exp()  # 1 / tau
    b, k = keep.shape
    if loss == "sigmoid":
        scores = batch_scores(selector, visual, text.reshape(b * k, -1))  # [B, P, B * K]
        rows = torch.arange(b, device=scores.device)
        own = scores.detach()[rows, tasks.to(scores.device)].view(b, b, k)[rows, rows] / scale  # [B, K]
        return sigmoid_loss(scores, asks.to(scores.device)), own  # own: cos of own plugin with own texts
    if loss == "decoupled":
        scores = pair_scores(selector, visual, text)  # [B, K]
        positive = torch.zeros(b, dtype=torch.long, device=scores.device)  # text 0 of each row
        return contrastive_loss(scores, positive, keep.to(scores.device)), scores.detach() / scale
    scores = batch_scores(selector, visual, text.reshape(b * k, -1))  # [B, B * K]
    rows = torch.arange(b, device=scores.device)
    own = scores.detach().view(b, b, k)[rows, rows] / scale  # [B, K]: each photo with its own texts
    same = same.to(scores.device)
    if loss == "infonce":
        return infonce_loss(scores, rows * k, same), own  # photo i's positive is text i * K
    return supcon_loss(scores, same), own


def make_optimizer(selector, lr, weight_decay=WEIGHT_DECAY):
    """AdamW with two parameter groups: the heads' weights and biases decay, logit_scale does not (decay would
    pull ln(1/tau) towards 0, i.e. tau towards 1, whatever the loss says; CLIP and OpenCLIP exclude it too)."""
    heads = [p for name, p in selector.named_parameters() if name != "logit_scale"]
    return torch.optim.AdamW([{"params": heads, "weight_decay": weight_decay},
                              {"params": [selector.logit_scale], "weight_decay": 0.0}], lr=lr)


def update(selector, optimizer, loss):
    """One AdamW step on `loss`, then logit_scale clamped to [0, ln 100] (CLIP's bound on 1/tau)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        selector.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


# ---------------------------------------------------------------------------------------------------------
# Training texts and batches
# ---------------------------------------------------------------------------------------------------------

@dataclass
class TrainingTexts:
    """Every training sentence with its tasks, and per task the indices of its positives and negatives."""
    texts: list  # [(text, tasks)]
    single: dict  # {task: [index of a single-task sentence of it]}
    multi: dict  # {task: [index of a multi-task request naming it]}
    negative: dict  # {task: [index of a text not naming it]}


def training_texts(corpus, seed, combinations=TRAIN_COMBINATIONS):
    """The training part of a corpus (restricted to the trained tasks), plus `combinations` random
    multi-task requests drawn from its single-task sentences, indexed for draw_batch."""
    texts = corpus.labelled() + combine(corpus, combinations, seed)
    single = {t: [i for i, (_, ts) in enumerate(texts) if ts == (t,)] for t in corpus.tasks}
    multi = {t: [i for i, (_, ts) in enumerate(texts) if len(ts) > 1 and t in ts] for t in corpus.tasks}
    negative = {t: [i for i, (_, ts) in enumerate(texts) if t not in ts] for t in corpus.tasks}
    return TrainingTexts(texts, single, multi, negative)


@dataclass
class Batch:
    photos: torch.Tensor  # [B] photo index (into the training photo list)
    tasks: torch.Tensor  # [B] task index (into the trained task list): the plugin of the pseudo-label
    texts: torch.Tensor  # [B, N+1] text index, the positive first
    indicator: torch.Tensor  # [B, N+1] bool, eq. 6's 1[c_i not in tasks(k)]
    same: torch.Tensor  # [B, B*(N+1)] bool: text m of the batch (texts flattened row-major) names photo i's task
    asks: torch.Tensor  # [B*(N+1), P] bool: text m of the batch asks for trained task p (the sigmoid labels)


def draw_batch(seed, step, photos_per_task, texts, batch, negatives):
    """Batch of update `step`: draws from a generator seeded by (seed, step) alone, so an interrupted and
    resumed run sees the same batches. photos_per_task: [[photo index]] per trained task, in task order."""
    g = generator_for(seed, "selector-batch", step)
    tasks = list(texts.single)
    photos, task_ids, rows = [], [], []
    for _ in range(batch):
        c = int(torch.randint(len(tasks), (1,), generator=g))
        pool = photos_per_task[c]
        photos.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        use_multi = bool(texts.multi[tasks[c]]) and float(torch.rand((), generator=g)) < MULTI_POSITIVE_SHARE
        pos = texts.multi[tasks[c]] if use_multi else texts.single[tasks[c]]
        neg = texts.negative[tasks[c]]
        picked = torch.randperm(len(neg), generator=g)[:negatives].tolist()  # N distinct negatives
        rows.append([pos[int(torch.randint(len(pos), (1,), generator=g))]] + [neg[k] for k in picked])
        task_ids.append(c)
    photo_tasks = [tasks[c] for c in task_ids]
    keep = indicator(photo_tasks, [[texts.texts[k][1] for k in row] for row in rows])  # [B, N+1]
    every = [texts.texts[k][1] for row in rows for k in row]  # B*(N+1) task tuples, row-major
    same = ~indicator(photo_tasks, [every] * len(rows))  # [B, B*(N+1)]
    asks = torch.tensor([[t in text_tasks for t in tasks] for text_tasks in every])  # [B*(N+1), P]
    return Batch(torch.tensor(photos), torch.tensor(task_ids), torch.tensor(rows), keep, same, asks)


def check_texts(texts, negatives):
    """ValueError (one line) when a task lacks positives or has fewer than `negatives` negatives."""
    for task in texts.single:
        if not texts.single[task]:
            raise ValueError(f"task {task!r} has no training sentence in the corpus")
        if len(texts.negative[task]) < negatives:
            raise ValueError(f"task {task!r}: {len(texts.negative[task])} training texts of other tasks, "
                             f"fewer than --negatives {negatives}")


# ---------------------------------------------------------------------------------------------------------
# Frozen features, cached on disk
# ---------------------------------------------------------------------------------------------------------

def text_key(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_key(path):
    """SHA-256 of a file's bytes (the cache key of a photo: renaming or moving it keeps its features)."""
    return sha256_file(path)


class FeatureCache:
    """{key: tensor} cached in the folder `folder`/`name` (name says which frozen networks made them).

    Each batch of computed features is one more shard file there (written atomically, never rewritten), so
    a kill loses at most one batch and a large cache is not copied again and again. folder None: no files.
    Stored in float32 on the CPU.
    """

    def __init__(self, folder, name):
        self.folder = None if folder is None else os.path.join(folder, name)
        self.store = {}
        if self.folder and os.path.isdir(self.folder):
            for shard in sorted(os.listdir(self.folder)):
                if shard.endswith(".safetensors") and not shard.startswith("."):
                    self.store.update(load_file(os.path.join(self.folder, shard)))

    def get(self, keys, compute, chunk, desc=None):
        """Stacked features of `keys`; compute(list of positions into keys) -> [n, ...] for the missing ones,
        `chunk` positions per call, each call's result saved as one shard. desc: progress bar title."""
        from tqdm import tqdm
        first = {}  # missing key -> its first position (a key repeated in `keys` is computed once)
        for i, k in enumerate(keys):
            if k not in self.store:
                first.setdefault(k, i)
        todo = list(first.values())
        with tqdm(total=len(todo), desc=desc, disable=desc is None or not todo, unit="item") as bar:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                new = {keys[i]: f.detach().float().cpu().contiguous() for i, f in zip(part, compute(part))}
                self.store.update(new)
                if self.folder:
                    name = hashlib.sha256("".join(new).encode()).hexdigest()[:16] + ".safetensors"
                    atomic_write(os.path.join(self.folder, name), lambda tmp: save_file(new, tmp))
                bar.update(len(part))
        return torch.stack([self.store[k] for k in keys]) if keys else torch.empty(0)


def model_key(*parts):
    """16 hex digits naming a set of frozen networks (file paths with size and mtime, or a fake seed)."""
    text = []
    for p in parts:
        st = os.stat(p) if isinstance(p, (str, os.PathLike)) and os.path.exists(p) else None
        text.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}" if st else str(p))
    return hashlib.sha256("|".join(text).encode()).hexdigest()[:16]


@torch.no_grad()
def plugin_features(clip_vision, plugins, image):
    """Max over the 256 TPB tokens of every plugin on one photo: [P, D] (the selector's visual input)."""
    feats = clip_features(clip_vision, image)  # [1, 256, clip_dim]
    rows = []
    for plugin in plugins:
        w = next(plugin.tpb.parameters())
        rows.append(plugin.tpb(feats.to(w.device, w.dtype))[0].amax(dim=0).float().cpu())  # [D]
    return torch.stack(rows)  # [P, D]


def photo_features(clip_vision, plugins, photos, cache, desc=None):
    """[n_photos, P, D] pooled TPB features of photos (file paths or PIL images), cached by content."""
    from minidiff.io.imageio import load_image

    def compute(positions):
        return [plugin_features(clip_vision, plugins, load_image(photos[i]) if isinstance(
            photos[i], (str, os.PathLike)) else photos[i]) for i in positions]
    return cache.get([photo_key(p) for p in photos], compute, chunk=PHOTO_CHUNK, desc=desc)


def sentence_features(sd, texts, cache, desc=None):
    """[n, D] pooled CLIP text embeddings of `texts`, cached by the sentences."""
    def compute(positions):
        return text_embedding(sd, [texts[i] for i in positions])  # [n, D]
    return cache.get([text_key(t) for t in texts], compute, chunk=TEXT_CHUNK, desc=desc)


# ---------------------------------------------------------------------------------------------------------
# What tools/train_selector.py and tools/eval_selector.py read: photos per task, frozen features
# ---------------------------------------------------------------------------------------------------------

def task_photos(folder, tasks):
    """{task: [photo path]} of the sub-folders `folder`/<task> (see resolve_tasks); ValueError for an empty
    one."""
    from minidiff.io.imageio import list_images
    photos = {t: list_images(os.path.join(folder, t)) for t in tasks}
    empty = [t for t, v in photos.items() if not v]
    if empty:
        raise ValueError(f"--images {folder}: no photos in {', '.join(empty)}")
    return photos


def fake_photos(tasks, per_task, seed, size=64):
    """{task: [PIL image]} of seeded random pixels, for --fake-weights runs without --images."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    pixels = {t: rng.integers(0, 256, (per_task, size, size, 3), dtype=np.uint8) for t in tasks}
    return {t: [Image.fromarray(p) for p in v] for t, v in pixels.items()}


def photo_key(photo):
    """Cache key of a photo: SHA-256 of the file, or of an in-memory image's size, mode and pixels."""
    if isinstance(photo, (str, os.PathLike)):
        return file_key(photo)
    return hashlib.sha256(f"{photo.size}{photo.mode}".encode() + photo.tobytes()).hexdigest()


def frozen_features(models, photos, texts, cache_dir, names, progress=True):
    """Everything the selector trains or is evaluated on, from the frozen networks of `models`
    (restoration.Models: sd, clip_vision, plugins in task order).

    photos: {task: [path or PIL image]}; texts: [str]; names: (text cache name, photo cache name).
    Returns (photo_feats [n_photos, P, D] through every plugin, photos_per_task [[photo index]] in the
    order of models.plugins, text_feats {text: [D]}).
    """
    tasks, flat, per_task = list(models.plugins), [], []
    for t in tasks:
        per_task.append(list(range(len(flat), len(flat) + len(photos.get(t, [])))))
        flat += photos.get(t, [])
    texts = list(dict.fromkeys(texts))
    text_feats = sentence_features(models.sd, texts, FeatureCache(cache_dir, names[0]),
                                   "text features" if progress else None)
    photo_feats = photo_features(models.clip_vision, [models.plugins[t] for t in tasks], flat,
                                 FeatureCache(cache_dir, names[1]), "photo features" if progress else None)
    return photo_feats, per_task, dict(zip(texts, text_feats))


def resolve_tasks(corpus, images, plugins, fake):
    """The tasks a run covers, in corpus order: the sub-folders of `images` (each must have corpus sentences
    and, unless fake, a plugin in the `plugins` folder); with fake weights and no images, every corpus task.
    ValueError (one line) otherwise."""
    if images is None:
        if not fake:
            raise ValueError("--images is required: one sub-folder of photos per task (derain/, face/, ...)")
        return list(corpus.tasks)
    if not os.path.isdir(images):
        raise ValueError(f"--images {images}: not a folder (it holds one sub-folder of photos per task)")
    found = {d for d in os.listdir(images)
             if os.path.isdir(os.path.join(images, d)) and not d.startswith(".")}
    missing = sorted(found - set(corpus.tasks))
    if missing:
        raise ValueError(f"--images: no corpus sentences for {', '.join(missing)}: add a key with its "
                         "sentences to a copy of minidiff/data/instructions.json and pass --instructions")
    if not fake:
        from minidiff.plugin.files import find_plugins
        have = find_plugins(plugins) if plugins and os.path.isdir(plugins) else {}
        missing = sorted(found - set(have))
        if missing:
            raise ValueError(f"--plugins {plugins}: no plugin for {', '.join(missing)}")
    if not found:
        raise ValueError(f"--images {images}: no sub-folders (one per task, named after it)")
    return [t for t in corpus.tasks if t in found]


def load_frozen(tasks, fake, sd=None, clip=None, plugins=None, device="cpu"):
    """Frozen networks for `tasks` -> (restoration.Models, (text cache name, photo cache name), {name: file}).
    fake: fake.fake_models(tasks) (its plugin k is the same for the same task list)."""
    from minidiff.plugin.fake import fake_models
    from minidiff.plugin.restoration import load_models
    if fake:
        models = fake_models(tasks, with_selector=False, device=device)
        return models, (f"text-fake-{model_key('fake')}", f"photos-fake-{model_key('fake', *tasks)}"), {}
    models, files = load_models(sd, clip, plugins, tasks=tasks, device=device, text_encoder=True)
    plugin_files = [files[f"plugin:{t}"] for t in tasks]
    return models, (f"text-{model_key(sd)}", f"photos-{model_key(clip, *plugin_files, *tasks)}"), files
