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



# ---------------------------------------------------------------- paired fidelity: PSNR and SSIM
# Conventions (those of restoration papers and of scikit-image's skimage.metrics, which the tests compare to):
#   data range  255 for uint8 images, 1.0 for float images (which must then lie in [0, 1]); all sums in float64
#   border      `crop_border` pixels are dropped from every side of both images first (0: none)
#   Y channel   ITU-R BT.601 luma of the studio-swing YCbCr, as MATLAB's rgb2ycbcr and BasicSR compute it:
#               Y = 16 + (65.481 R + 128.553 G + 24.966 B) for R, G, B in [0, 1], kept as float (no rounding),
#               so Y lies in [16, 235] on the 255 scale; data range 255 (1.0 on floats, with Y / 255)
#   PSNR        10 log10(L^2 / MSE), the MSE over every pixel and channel; identical images give +inf
#   SSIM        Wang, Bovik, Sheikh and Simoncelli, "Image Quality Assessment: From Error Visibility to
#               Structural Similarity" (IEEE TIP 2004): an 11x11 Gaussian window of sigma 1.5, K1 0.01,
#               K2 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2, population (not sample) variances, the SSIM map over the
#               positions where the whole window fits ("valid": 5 pixels lost on each side), then its mean.
#               RGB SSIM is the mean over the three channels of each channel's SSIM. This is
#               structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False) in
#               scikit-image, which filters the whole image and then drops the same 5-pixel border.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # window 11x11: scikit-image's int(3.5 * sigma + 0.5), Wang et al.'s 11x11
SSIM_K1, SSIM_K2 = 0.01, 0.03
BT601_Y = (65.481, 128.553, 24.966)  # RGB in [0, 1] -> Y in [16, 235] (with the offset 16)


def _as_float(img):
    """(float64 array, data range): uint8 -> range 255; float -> range 1.0 (values must lie in [0, 1])."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img.astype(np.float64), 255.0
    if not np.issubdtype(img.dtype, np.floating):
        raise MetricsError(f"PSNR/SSIM take uint8 or float images in [0, 1], got {img.dtype}")
    if img.size and (img.min() < 0 or img.max() > 1):
        raise MetricsError(f"a float image must lie in [0, 1], got [{img.min():.4g}, {img.max():.4g}]")
    return img.astype(np.float64), 1.0


def _prepare(a, b, crop_border, y_channel):
    """Both images as float64 [H, W, C] (C = 1 for Y), the border cropped; and the data range."""
    a, range_a = _as_float(a)
    b, range_b = _as_float(b)
    if a.shape != b.shape or range_a != range_b:
        raise MetricsError(f"PSNR/SSIM need two images of one shape and type, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]  # grey [H, W] -> [H, W, 1]
    if crop_border:
        a, b = (x[crop_border:-crop_border, crop_border:-crop_border] for x in (a, b))
    if y_channel:
        if a.shape[2] != 3:
            raise MetricsError(f"the Y channel needs RGB images, got {a.shape[2]} channel(s)")
        a, b = (rgb_to_y(x, range_a) for x in (a, b))
    return a, b, range_a


def rgb_to_y(img, data_range=255.0):
    """BT.601 luma Y of float RGB [H, W, 3] on the scale `data_range` -> [H, W, 1], same scale, unrounded."""
    rgb = img / data_range  # [0, 1]
    y = 16.0 + rgb[..., 0] * BT601_Y[0] + rgb[..., 1] * BT601_Y[1] + rgb[..., 2] * BT601_Y[2]  # [16, 235]
    return (y * (data_range / 255.0))[..., None]


def psnr(a, b, crop_border=0, y_channel=False):
    """PSNR in dB of two images (uint8 or float in [0, 1], [H, W] or [H, W, C]); +inf when identical."""
    a, b, data_range = _prepare(a, b, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _gaussian_window():
    """The normalised 1-D Gaussian of sigma 1.5 over -5..5; the 11x11 window is its outer product."""
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _filter_valid(x, g):
    """Separable correlation of [H, W] with the window g (x then y), keeping only the valid positions:
    [H, W] -> [H - 10, W - 10]. Written as a sum of shifted slices: each output pixel is the weighted sum of the
    11 x 11 pixels around it."""
    n = len(g)
    h, w = x.shape
    rows = sum(g[k] * x[:, k:w - n + 1 + k] for k in range(n))  # [H, W - 10]
    return sum(g[k] * rows[k:h - n + 1 + k] for k in range(n))  # [H - 10, W - 10]


def _ssim_channel(x, y, data_range):
    """Mean SSIM of one channel pair [H, W], float64 (Wang et al. 2004, eq. 13, Gaussian-weighted stats)."""
    g = _gaussian_window()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    # local (population) variances and covariance: E[x^2] - E[x]^2 under the window
    var_x = _filter_valid(x * x, g) - mu_x * mu_x
    var_y = _filter_valid(y * y, g) - mu_y * mu_y
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean()


def ssim(a, b, crop_border=0, y_channel=False):
    """SSIM of two images (uint8 or float in [0, 1], [H, W] or [H, W, C]): the mean over channels of each
    channel's mean SSIM; both sides must be at least 11 pixels after the border crop."""
    a, b, data_range = _prepare(a, b, crop_border, y_channel)
    if min(a.shape[:2]) < 2 * SSIM_RADIUS + 1:
        raise MetricsError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1} pixels "
                           f"(after the border crop), got {a.shape[1]}x{a.shape[0]}")
    return float(np.mean([_ssim_channel(a[..., c], b[..., c], data_range) for c in range(a.shape[2])]))


def fidelity(result, gt, crop_border=0):
    """{psnr_rgb, psnr_y, ssim_rgb, ssim_y} of a restored image against its ground truth (uint8 RGB)."""
    return {"psnr_rgb": psnr(result, gt, crop_border), "psnr_y": psnr(result, gt, crop_border, True),
            "ssim_rgb": ssim(result, gt, crop_border), "ssim_y": ssim(result, gt, crop_border, True)}


# ---------------------------------------------------------------- pairing results with their ground truth
SIZE_RULES = ("resize", "refuse")


def stem(path):
    """A file's name without folder and extension: results pair with ground truth by it (x.png <-> x.jpg)."""
    return os.path.splitext(os.path.basename(path))[0]


def pair_by_name(results, gt):
    """({stem: (result, gt file)}, [result stems without ground truth]); `gt` is a list of files or a dict
    {stem: file}. Two ground-truth files of one stem (x.png and x.jpg) are refused: the pairing would guess."""
    if not isinstance(gt, dict):
        by_stem = {}
        for f in gt:
            if stem(f) in by_stem:
                raise MetricsError(f"{f} and {by_stem[stem(f)]}: two ground-truth files named {stem(f)}")
            by_stem[stem(f)] = f
        gt = by_stem
    pairs = {stem(r): (r, gt[stem(r)]) for r in results if stem(r) in gt}
    return pairs, [stem(r) for r in results if stem(r) not in gt]


def paired_fidelity(pairs, crop_border=0, size_rule="resize"):
    """{stem: fidelity(...) + sizes} for {stem: (result file, gt file)}, in stem order.

    A result whose size differs from its ground truth's (tools/sample.py returns the processed size, e.g. a
    600x400 LOL photo comes back 768x512) is, with size_rule "resize", resized to the ground truth's size with
    PIL bicubic on the uint8 image (the filter the official scripts resize with) and its record says so
    ("resized_from"); with "refuse" it is an error naming the file.
    """
    if size_rule not in SIZE_RULES:
        raise MetricsError(f"unknown size rule {size_rule!r} (choose from {', '.join(SIZE_RULES)})")
    out = {}
    for name in sorted(pairs):
        result_path, gt_path = pairs[name]
        result, gt = read_image(result_path), read_image(gt_path)
        rec = {"result": os.path.abspath(result_path), "gt": os.path.abspath(gt_path),
               "size": [gt.shape[1], gt.shape[0]]}
        if result.shape != gt.shape:
            if size_rule == "refuse":
                raise MetricsError(f"{result_path}: {result.shape[1]}x{result.shape[0]}, but its ground truth "
                                   f"{gt_path} is {gt.shape[1]}x{gt.shape[0]} (--size-mismatch resize scores "
                                   "it after a bicubic resize)")
            rec["resized_from"] = [result.shape[1], result.shape[0]]
            result = np.asarray(Image.fromarray(result).resize((gt.shape[1], gt.shape[0]), Image.BICUBIC))
        out[name] = {**fidelity(result, gt, crop_border), **rec}
    return out


def fidelity_means(per_photo):
    """Means over photos of psnr_rgb, psnr_y, ssim_rgb, ssim_y (a PSNR mean is +inf if any pair is identical)."""
    keys = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y")
    return {k: float(np.mean([p[k] for p in per_photo.values()])) for k in keys}
