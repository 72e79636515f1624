"""FID and KID on minidiff's own feature networks (CLIP ViT-B/32, the paper's "CLIP-FID"; FID InceptionV3).

Papers: Heusel et al. 2017 (FID, Frechet distance between Gaussian fits of features); Binkowski et al.,
"Demystifying MMD GANs" (ICLR 2018, KID); Kynkaanniemi et al., "The Role of ImageNet Classes in Frechet
Inception Distance" (ICLR 2023, FID on CLIP features). Diff-Plugin (CVPR 2024) reports FID/KID on CLIP B/32.
Mirrors clean-fid 0.1.35 (GaParmar/clean-fid): `cleanfid/fid.py` (file list, frechet_distance,
kernel_distance), `cleanfid/utils.py` (ResizeDataset), `cleanfid/clip_features.py` (img_preprocess_clip,
CLIP_fx); and pytorch-fid 0.3.0 `pytorch_fid/fid_score.py` for the Inception path (see minidiff/eval/inception.py).

Feature types:
  clip_vit_b_32  clean-fid's CLIP path, which the official Diff-Plugin metrics use: uint8 RGB -> PIL bicubic
                 resize of the short side to 224 -> centre crop 224 -> /255 -> CLIP mean/std -> projected
                 class token (512-d, not L2-normalised), all in float32.
  inception      pytorch-fid's default: [0,1] -> bilinear 299x299 -> 2x-1 -> FID Inception pool3 (2048-d).
Statistics are float64 (np.mean/np.cov as both libraries compute them); KID uses clean-fid's defaults.
"""
import glob
import os

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from minidiff.errors import MetricsError  # noqa: F401 (raised here, imported from here)
from minidiff.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from minidiff.io.files import atomic_write

FEATURE_TYPES = ("clip_vit_b_32", "inception")
FEATURE_DIMS = {"clip_vit_b_32": 512, "inception": 2048}
# clean-fid's EXTENSIONS (utils.py): globbed case-sensitively, so "x.Png" is not an image there either
EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy", "JPEG", "JPG", "PNG")
CLIP_SIZE = 224
KID_SUBSETS = 100  # clean-fid kernel_distance defaults
KID_MAX_SUBSET = 1000


# ---------------------------------------------------------------- reading folders, as clean-fid does
def list_images(folder):
    """Sorted recursive glob of clean-fid's image extensions; files with other extensions are ignored."""
    if not os.path.isdir(folder):
        raise MetricsError(f"{folder}: not a folder")
    files = sorted(f for ext in EXTENSIONS
                   for f in glob.glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))
    if not files:
        raise MetricsError(f"{folder}: no image files ({', '.join(EXTENSIONS[:10])})")
    return files


def read_image(path):
    """uint8 RGB array [H, W, 3]: PIL open + convert('RGB'), no EXIF rotation (clean-fid ResizeDataset)."""
    try:
        if path.endswith(".npy"):  # clean-fid also reads pre-decoded uint8 arrays
            arr = np.load(path, allow_pickle=False)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"expected a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")
            return arr
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:
        raise MetricsError(f"{path}: cannot read image ({str(e).splitlines()[0][:160]})") from None


# ---------------------------------------------------------------- preprocessing
def clip_resize(arr):
    """clean-fid img_preprocess_clip: torchvision Resize(224, BICUBIC) + CenterCrop(224) on the PIL image.

    Resize: short side -> 224, long side -> int(224 * long / short) (truncated), PIL bicubic (which
    antialiases); skipped when the size already matches. CenterCrop: offsets int(round((size - 224) / 2)),
    Python's round-half-even. Returns uint8 [224, 224, 3].
    """
    im = Image.fromarray(arr)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = CLIP_SIZE, int(CLIP_SIZE * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - CLIP_SIZE) / 2.0)), int(round((new_w - CLIP_SIZE) / 2.0))
    return np.asarray(im.crop((left, top, left + CLIP_SIZE, top + CLIP_SIZE)))


def clip_pixels(arr):
    """uint8 [H, W, 3] -> [3, 224, 224] float32 CLIP input, op for op as clean-fid computes it."""
    x = torch.from_numpy(np.array(clip_resize(arr))).permute(2, 0, 1)  # [224, 224, 3] -> [3, 224, 224]
    # ToTensor()*255 (dataset) then /255 (CLIP_fx): kept as two float32 steps, which can move a value by 1 ulp
    x = x.float().div(255) * 255 / 255.0
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)  # clean-fid CLIP_fx
    return (x - mean[:, None, None]) / std[:, None, None]


# ---------------------------------------------------------------- feature extractors
class FeatureExtractor:
    """A feature network with its per-image preprocessing: __call__(uint8 arrays) -> float32 [B, D]."""

    def __init__(self, name, model, preprocess, device="cpu"):
        self.name, self.model, self.preprocess, self.device = name, model, preprocess, device

    @torch.no_grad()
    def __call__(self, arrays):
        x = torch.stack([self.preprocess(a) for a in arrays]).to(self.device)  # [B, 3, S, S]
        out = self.model(x)
        if self.name == "clip_vit_b_32":
            out = out.image_embeds  # ln_post(CLS) @ proj, not normalised (OpenAI encode_image)
        return out.float().cpu().numpy()


def load_feature_extractor(feature_type, weights, device="cpu"):
    """FeatureExtractor for `feature_type` from a weights file; float32 on `device`.

    clip_vit_b_32: OpenAI ViT-B-32.pt state dict (fp16 parts are upcast) or a Hugging Face CLIP file/folder.
    inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth.
    """
    if feature_type == "clip_vit_b_32":
        from minidiff.io.loading import load_clip_vision
        model = load_clip_vision(weights, dtype=torch.float32, device=device)
        cfg = model.cfg
        if (cfg.patch_size, cfg.width, cfg.layers) != (32, 768, 12):
            raise MetricsError(f"{weights}: not a CLIP ViT-B/32 vision tower (patch {cfg.patch_size}, "
                               f"width {cfg.width}, {cfg.layers} layers)")
        if cfg.projection is None:  # e.g. a transformers CLIPVisionModel file: no visual_projection
            raise MetricsError(f"{weights}: no visual projection (the feature is the projected class token); "
                               "use ViT-B-32.pt or a CLIPModel / CLIPVisionModelWithProjection file")
        return FeatureExtractor(feature_type, model, clip_pixels, device)
    if feature_type == "inception":
        from minidiff.eval.inception import inception_pixels, load_inception
        return FeatureExtractor(feature_type, load_inception(weights, device), inception_pixels, device)
    raise MetricsError(f"unknown feature type {feature_type!r} (choose from {', '.join(FEATURE_TYPES)})")


def files_features(files, extractor, batch_size=32, progress=True, desc="features"):
    """float32 [N, D] features of image files, in order, batch by batch with a tqdm bar."""
    feats = []
    for i in tqdm(range(0, len(files), batch_size), desc=desc, disable=not progress, unit="batch"):
        feats.append(extractor([read_image(f) for f in files[i:i + batch_size]]))
    return np.concatenate(feats)


# ---------------------------------------------------------------- statistics
def statistics(feats):
    """(mu, sigma) of features [N, D] in float64: np.mean and np.cov(rowvar=False), i.e. with N-1."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise MetricsError(f"need at least 2 feature vectors for a covariance, got shape {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), with clean-fid's / pytorch-fid's safeguards.

    If sqrtm of the product is not finite (near-singular covariances, e.g. fewer images than dimensions),
    eps is added to both diagonals and sqrtm retried; a complex result is accepted (real part) only if the
    imaginary parts of its diagonal are within 1e-3 of zero, as both libraries do.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f"statistics differ in size: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # numerical error can leave a small imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricsError(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid_subset_size(n1, n2, max_subset_size=KID_MAX_SUBSET):
    """clean-fid's subset size m = min(n1, n2, 1000); below 2 the unbiased estimate is undefined."""
    m = min(n1, n2, max_subset_size)
    if m < 2:
        raise MetricsError(f"KID needs at least 2 images in each set, got {n1} and {n2}")
    return m


def kernel_distance(feats1, feats2, num_subsets=KID_SUBSETS, max_subset_size=KID_MAX_SUBSET, seed=0):
    """KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    As clean-fid's kernel_distance: m = min(n1, n2, 1000) rows drawn without replacement from each set per
    subset (first from feats2, then feats1). clean-fid draws from numpy's global, unseeded RNG; here a
    np.random.RandomState(seed) (default 0) is used, so results are reproducible, and equal clean-fid's after
    np.random.seed(seed). seed=None gives fresh OS entropy. With exactly m images in both sets every subset
    is a permutation and the value does not depend on the seed.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    rng = np.random.RandomState(seed)
    d = feats1.shape[1]
    m = kid_subset_size(feats1.shape[0], feats2.shape[0], max_subset_size)
    t = 0
    for _ in range(num_subsets):
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)]
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3  # within-set kernels, diagonal excluded below
        b = (x @ y.T / d + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


# ---------------------------------------------------------------- saved statistics
def save_stats(path, feats, feature_type, weights_sha256=""):
    """Write mu, sigma, feats (for KID), feature_type and count to an .npz, atomically (files.atomic_write)."""
    mu, sigma = statistics(feats)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object keeps np.savez from appending ".npz" to the temp name
            np.savez(f, mu=mu, sigma=sigma, feats=np.asarray(feats, np.float32), count=np.array(len(feats)),
                     feature_type=np.array(feature_type), weights_sha256=np.array(weights_sha256))
    atomic_write(path, write)


def load_stats(path, feature_type=None):
    """dict(mu, sigma, feats or None, feature_type, count) from save_stats' .npz or a clean-fid stats file.

    clean-fid's own files hold only mu/sigma (or feats in its *_kid.npz): their feature type is taken from the
    dimension (512 -> clip_vit_b_32, 2048 -> inception). A type other than `feature_type` is an error.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        why = str(e).splitlines()[0][:160]
        raise MetricsError(f"{path}: not a readable .npz statistics file ({why})") from None
    feats = data.get("feats")
    if "mu" not in data and feats is None:
        raise MetricsError(f"{path}: holds neither mu/sigma nor feats")
    if "mu" in data:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    else:
        mu, sigma = statistics(feats)
    dim_type = {v: k for k, v in FEATURE_DIMS.items()}.get(mu.shape[0], f"unknown ({mu.shape[0]}-d)")
    kind = str(data["feature_type"]) if "feature_type" in data else dim_type
    if feature_type is not None and kind != feature_type:
        raise MetricsError(f"{path}: statistics of {kind} features, but {feature_type} features were asked")
    count = int(data["count"]) if "count" in data else (len(feats) if feats is not None else None)
    return {"mu": mu, "sigma": sigma, "feats": feats, "feature_type": kind, "count": count}

