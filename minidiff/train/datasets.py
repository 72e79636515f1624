"""Training data for Task-Plugins: (degraded, clean) photo pairs from paired folders, the official CSV, or
clean photos degraded on the fly; the official resize / paired augmentation; a held-out validation split.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024).
Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, dataset/dataset.py: the CSV has the header
`image,conditioning_image` = ground truth, degraded input (l.118-130; the README shows them the other way
round, the loader and the shipped CSVs are right), relative paths joined to --data_root; both photos are
resized to the resolution square with PIL bilinear, aspect not kept (l.135-141); `--use_data_aug` (l.28-66)
crops both photos at the same place with p 0.5 and flips both with p 0.5, then resizes; the face task
degrades the INPUT photo on the fly (l.69-116, here minidiff.train.degrade for every task).

Three layouts of --data:
    pairs/input/X.png + pairs/gt/X.png     paired folders, same file names
    train.csv                              `image,conditioning_image` rows, paths relative to --data-root
    photos/*.jpg + --degrade TASK          clean photos only: the input is degrade(TASK, photo, seed)
Every random choice (augmentation, degradation) is a function of (seed, item, epoch), so any process
loads the same sample for the same global sample number (minidiff.train.seeding.sample_item).
"""
import csv
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from minidiff.io.files import sha256_file
from minidiff.io.imageio import ImageError, list_images, load_image
from minidiff.errors import UsageError
from minidiff.train.seeding import derive_seed, sample_item

CSV_HEADER = ["image", "conditioning_image"]  # ground truth, degraded input (dataset.py l.126-127)


def list_pairs(data, data_root=None, degrade=None):
    """--data -> [(input path, gt path)], sorted; UsageError (one line) for a missing, empty or mismatched
    source. With --degrade the input is made from the gt photo, so a clean-only folder gives (X, X)."""
    if not os.path.exists(data):
        raise UsageError(f"--data {data}: no such file or folder")
    if os.path.isfile(data):
        if not data.lower().endswith(".csv"):
            raise UsageError(f"--data {data}: give a folder or a .csv file")
        return _csv_pairs(data, data_root or "")
    inp, gt = os.path.join(data, "input"), os.path.join(data, "gt")
    if os.path.isdir(inp) and os.path.isdir(gt):
        a = {os.path.basename(p): p for p in list_images(inp)}
        b = {os.path.basename(p): p for p in list_images(gt)}
        if a.keys() != b.keys():
            odd = sorted(a.keys() ^ b.keys())
            raise UsageError(f"--data {data}: input/ and gt/ names differ "
                             f"({len(odd)} unmatched, e.g. {odd[0]})")
        pairs = [(a[n], b[n]) for n in sorted(a)]
    elif degrade:
        pairs = [(p, p) for p in list_images(data)]
    else:
        raise UsageError(f"--data {data}: no input/ and gt/ folders (clean photos only? add --degrade TASK)")
    if not pairs:
        raise UsageError(f"--data {data}: no images found")
    return pairs


def _csv_pairs(path, root):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--data {path}: unreadable CSV ({e})") from None
    if not rows or [c.strip() for c in rows[0]] != CSV_HEADER:
        raise UsageError(f"--data {path}: the first line must be the header {','.join(CSV_HEADER)}")
    pairs = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise UsageError(f"--data {path} line {line}: expected 2 columns, got {len(row)}")
        gt, inp = (os.path.join(root, c.strip()) for c in row)
        for p in (gt, inp):
            if not os.path.isfile(p):
                raise UsageError(f"--data {path} line {line}: no such file {p}")
        pairs.append((inp, gt))
    if not pairs:
        raise UsageError(f"--data {path}: no rows after the header")
    return pairs


def identical_pairs(pairs):
    """How many pairs name the same photo as input and ground truth: the same file (path or link), or two
    files with the same bytes (SHA-256, read only when the sizes agree). The official face.csv is all such
    rows; its loader degrades the input only because the run's name contains "face" (dataset.py l.147-149),
    so read without a degradation such a listing trains an identity mapping."""
    count = 0
    for inp, gt in pairs:
        if os.path.realpath(inp) == os.path.realpath(gt):
            count += 1
        elif os.path.getsize(inp) == os.path.getsize(gt) and sha256_file(inp) == sha256_file(gt):
            count += 1
    return count


def resolve_identical_pairs(pairs, task, degrade, data):
    """The face trap. Pairs whose input is their ground truth, with no --degrade given: for --task face,
    the official face degradation of every input (as the official loader does) -> ("face", a line to
    print); for any other task a UsageError naming the count. Otherwise (degrade, None) unchanged."""
    if degrade is not None:
        return degrade, None
    same = identical_pairs(pairs)
    if not same:
        return None, None
    if task == "face":
        return "face", (f"--task face: {same} of {len(pairs)} pairs have the same photo as input and ground "
                        "truth (as the official face.csv); every input gets the official face degradation, "
                        "as the official loader does (dataset.py l.147-149)")
    raise UsageError(f"--data {data}: {same} of {len(pairs)} pairs have the same photo as input and ground "
                     f"truth, which trains an identity mapping; add --degrade TASK to make the inputs")


def check_images(pairs, same_size=False, workers=4):
    """Decode every photo once (threads); UsageError naming the first unreadable one. same_size: also
    require input and gt of a pair to have one size (the paired crop of --augment needs it)."""
    def size(path):
        try:
            return load_image(path).size
        except ImageError as e:
            return str(e)
    paths = sorted({p for pair in pairs for p in pair})
    with ThreadPoolExecutor(max(1, workers)) as pool:
        sizes = dict(zip(paths, pool.map(size, paths)))
    for p in paths:
        if isinstance(sizes[p], str):
            raise UsageError(sizes[p])
    for inp, gt in pairs if same_size else []:
        if sizes[inp] != sizes[gt]:
            raise UsageError(f"--augment: {inp} is {sizes[inp]} but {gt} is {sizes[gt]}; "
                             "a paired crop needs one size")


def split_validation(pairs, count, seed):
    """(train pairs, validation pairs): `count` pairs held out, chosen by a seeded permutation."""
    if count == 0:
        return pairs, []
    if len(pairs) <= count:
        raise UsageError(f"--val-pairs {count}: the data has only {len(pairs)} pair(s); "
                         "use fewer (or 0 for no validation)")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(derive_seed(seed, "val")))
    held = set(order[:count].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)])


def paired_augment(inp, gt, size, rng):
    """dataset.py l.28-66 with 512 -> `size`: with p 0.5 a paired random crop (size x size when both sides
    exceed it; when a side is below it, a square of the short side along the long axis; else none), then
    with p 0.5 a paired horizontal flip. rng: random.Random (the official code uses `random`)."""
    w, h = inp.size
    if rng.random() > 0.5:
        if w > size and h > size:
            top, left = rng.randint(0, h - size), rng.randint(0, w - size)
            box = (left, top, left + size, top + size)
        elif w < size or h < size:
            short = min(w, h)
            start = rng.randint(0, max(w, h) - short)
            box = (start, 0, start + short, short) if w > h else (0, start, short, start + short)
        else:
            box = None
        if box is not None:
            inp, gt = inp.crop(box), gt.crop(box)
    if rng.random() > 0.5:
        inp, gt = inp.transpose(Image.FLIP_LEFT_RIGHT), gt.transpose(Image.FLIP_LEFT_RIGHT)
    return inp, gt


def to_training_tensor(image):
    """PIL RGB -> [3, H, W] float32: ToTensor then Normalize(0.5, 0.5), as torchvision computes it."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0)  # [H, W, 3]
    return ((x - 0.5) / 0.5).permute(2, 0, 1).contiguous()  # [3, H, W] in [-1, 1]


class PairDataset(torch.utils.data.Dataset):
    """Indexed by GLOBAL SAMPLE NUMBER n (see seeding.sample_item): returns (degraded [3, R, R],
    clean [3, R, R], n). The photo pair, its augmentation and degradation depend on (seed, item, epoch)."""

    def __init__(self, pairs, resolution, seed, augment=False, degrade=None):
        self.pairs, self.resolution, self.seed = pairs, resolution, seed
        self.augment, self.degrade = augment, degrade

    def __len__(self):
        return len(self.pairs)

    def load(self, item, epoch):
        """The pair `item` as PIL images at resolution x resolution, as seen in `epoch`."""
        inp_path, gt_path = self.pairs[item]
        gt = load_image(gt_path)
        inp = gt if inp_path == gt_path and self.degrade else load_image(inp_path)
        if self.degrade:  # dataset.py l.69-116: the INPUT is degraded, before augmentation and resizing
            from minidiff.train.degrade import degrade
            inp = degrade(self.degrade, inp, (self.seed, item, epoch))
        if self.augment:
            rng = random.Random(derive_seed(self.seed, "augment", item, epoch))
            inp, gt = paired_augment(inp, gt, self.resolution, rng)
        size = (self.resolution, self.resolution)
        return inp.resize(size, Image.BILINEAR), gt.resize(size, Image.BILINEAR)

    def __getitem__(self, n):
        item, epoch = sample_item(self.seed, len(self.pairs), n)
        inp, gt = self.load(item, epoch)
        return to_training_tensor(inp), to_training_tensor(gt), n
