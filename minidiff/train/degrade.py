"""Synthetic degradations for the eight Diff-Plugin tasks: (degraded, clean) training pairs from clean photos.

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks", CVPR 2024.
Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb. Only its `face` task degrades on the fly (dataset/dataset.py
l.69-116, with dataset/degradation.py copied from XPixelGroup/BasicSR basicsr/data/degradations.py); the
other seven train on captured pairs (RESIDE, GoPro, LOL, SHIQ, ...), so their models below are our own.

`face` is the official pipeline, step for step, with Pillow/numpy/scipy in place of OpenCV:
  41x41 Gaussian blur, isotropic or anisotropic (p 0.5/0.5), sigma U[0.1, 10], rotation U[-pi, pi]
  (cv2.filter2D) -> downscale by U[0.8, 8] to (int(w // s), int(h // s)) (cv2.resize INTER_LINEAR)
  -> Gaussian colour noise, sigma U[0, 20] / 255, clip -> JPEG, quality int(U[60, 100]) (cv2.imencode)
  -> resize back (INTER_LINEAR) -> round/clip to uint8.
The OpenCV stand-ins (`filter2d`, `resize_linear`, `jpeg`) follow OpenCV 4.x's rules. Checked against
opencv-python-headless 4.14 on float32 photos: filter2d within 6e-8, resize_linear within 1.2e-6, jpeg
bit-identical; the whole face pipeline, fed the same parameters and noise, gives the same uint8 image but for
0.016 % of the values (at most 4 levels: a rounding flip before the JPEG step). The random numbers cannot
match: the official code draws from Python's and numpy's global generators; here every draw comes from one
`numpy.random.Generator`.

The other seven, each a short function of (image float32 HWC in [0, 1], rng) -> same:
  deblur    motion (a line) or defocus (a disk) kernel
  derain    sparse drops smeared into thin slanted streaks, screen-blended
  desnow    flakes in depth layers (soft blobs stretched along the fall), over a faint white veil
  lowlight  under-exposure in linear light + Poisson-Gaussian (shot + read) sensor noise
  dehaze    atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), with a depth proxy d
  highlight dichromatic model: the photo as diffuse part plus a few saturating near-white specular lobes
  demoire   a screen's RGB subpixel grid, rotated and lens-bent, point-sampled by the camera (aliasing)
"""
import io
import math

import numpy as np
from PIL import Image
from scipy import signal

# ---------------------------------------------------------------------------------------------------------
# OpenCV stand-ins


def filter2d(img, kernel):
    """cv2.filter2D(img, -1, kernel): correlation (no kernel flip), anchor at the centre, border
    BORDER_REFLECT_101 (= numpy 'reflect', scipy.ndimage 'mirror'). img [H, W, C], odd square kernel.

    Done by FFT on the padded image (OpenCV also switches to a DFT for float kernels of 11x11 and up);
    a 41x41 direct correlation would cost ~1.3 GMAC at 512x512. Result differs from OpenCV by float rounding.
    """
    k = kernel.shape[0]
    assert kernel.shape == (k, k) and k % 2 == 1, "odd square kernels only"
    p = k // 2
    padded = np.pad(img.astype(np.float64), ((p, p), (p, p), (0, 0)), mode="reflect")  # [H+2p, W+2p, C]
    # fftconvolve flips the kernel: flip it first to get OpenCV's correlation.
    out = signal.fftconvolve(padded, kernel[::-1, ::-1, None], mode="valid", axes=(0, 1))  # [H, W, C]
    return out.astype(img.dtype)


def _linear_taps(n_in, n_out):
    """Source index pairs and weights of cv2.resize INTER_LINEAR along one axis (resize.cpp, float path)."""
    scale = 1.0 / (n_out / n_in)  # OpenCV: scale_x = 1. / inv_scale_x, inv_scale_x = dsize / ssize
    x = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)  # pixel centres, in float32 as OpenCV
    x = np.clip(x, 0, n_in - 1)  # outside the first/last centre: the edge pixel, weight 1 (no wrap, no fade)
    x0 = np.floor(x).astype(np.int64)
    frac = (x - x0).astype(np.float32)
    return x0, np.minimum(x0 + 1, n_in - 1), frac


def resize_linear(img, width, height):
    """cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR) for a float32 [H, W, C] image.

    OpenCV's INTER_LINEAR samples the source at half-pixel centres with 2 taps per axis and does NOT
    antialias when shrinking (a 4x downscale reads 2 of every 4 source pixels). PIL's BILINEAR widens its
    filter by the scale factor on downscales (it averages all of them), so it is not used here: the face
    model would see smoother, less aliased inputs than the official one. (OpenCV turns an exact 2x
    shrink into INTER_AREA, a 2x2 mean, which is the same as these taps at that scale.)
    """
    ys0, ys1, fy = _linear_taps(img.shape[0], height)
    xs0, xs1, fx = _linear_taps(img.shape[1], width)
    # horizontal pass, then vertical, as OpenCV does (HResizeLinear, VResizeLinear)
    rows = img[:, xs0] * (1 - fx)[None, :, None] + img[:, xs1] * fx[None, :, None]  # [H, width, C]
    return rows[ys0] * (1 - fy)[:, None, None] + rows[ys1] * fy[:, None, None]  # [height, width, C]


def jpeg(img, quality):
    """cv2.imdecode(cv2.imencode('.jpg', img * 255., [IMWRITE_JPEG_QUALITY, quality])[1], 1) / 255.

    OpenCV converts the float image to uint8 with saturate_cast (round half to even, clip), then libjpeg
    with its defaults: baseline quant tables scaled by `quality`, 4:2:0 chroma subsampling, integer DCT.
    Pillow (libjpeg-turbo) does the same: its default subsampling leaves libjpeg's own, 4:2:0, which is
    spelled out here so the match does not rest on a default. Same quality -> same quant tables.
    """
    u8 = np.rint(np.clip(img, 0, 1) * np.float32(255.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0")
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0


# ---------------------------------------------------------------------------------------------------------
# face: the official pipeline (dataset.py `apply_degradation` defaults)

FACE_KERNEL_SIZE = 41
FACE_ISO_PROB = 0.5  # kernel_list ['iso', 'aniso'], kernel_prob [0.5, 0.5]
FACE_BLUR_SIGMA = (0.1, 10.0)  # both axes
FACE_ROTATION = (-math.pi, math.pi)  # anisotropic kernels only
FACE_DOWNSAMPLE = (0.8, 8.0)  # scale factor s: (w, h) -> (int(w // s), int(h // s)); s < 1 enlarges
FACE_NOISE = (0.0, 20.0)  # Gaussian sigma, in 8-bit levels
FACE_JPEG = (60, 100)  # quality = int(U[60, 100]), so 60..99


def bivariate_gaussian(size, sigma_x, sigma_y, theta):
    """BasicSR `bivariate_Gaussian`: exp(-x^T S^-1 x / 2) on a size x size grid, normalised to sum 1,
    with S = R diag(sigma_x^2, sigma_y^2) R^T and R the rotation by theta."""
    ax = np.arange(-(size // 2), size // 2 + 1.0)  # BasicSR mesh_grid: -20 .. 20 for 41
    xx, yy = np.meshgrid(ax, ax)  # xx: column offset, yy: row offset, [size, size] each
    grid = np.stack([xx, yy], -1)  # [size, size, 2]
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rot @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rot.T
    kernel = np.exp(-0.5 * np.sum((grid @ np.linalg.inv(cov)) * grid, -1))  # [size, size]
    kernel = kernel / kernel.sum()
    return kernel / kernel.sum()  # BasicSR normalises twice (random_bivariate_Gaussian l.217): rounding only


def face_params(rng):
    """Draw the official face degradation's parameters (random_mixed_kernels and dataset.py l.89-107)."""
    iso = rng.random() < FACE_ISO_PROB
    sigma_x = rng.uniform(*FACE_BLUR_SIGMA)
    # BasicSR: an isotropic kernel draws only sigma_x (sigma_y = sigma_x, rotation 0)
    sigma_y = sigma_x if iso else rng.uniform(*FACE_BLUR_SIGMA)
    theta = 0.0 if iso else rng.uniform(*FACE_ROTATION)
    return {
        "kernel_type": "iso" if iso else "aniso",
        "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta,
        "kernel": bivariate_gaussian(FACE_KERNEL_SIZE, sigma_x, sigma_y, theta),
        "scale": rng.uniform(*FACE_DOWNSAMPLE),
        "noise_sigma": rng.uniform(*FACE_NOISE),
        "quality": int(rng.uniform(*FACE_JPEG)),
    }


def face(img, rng):
    """Official face degradation: blur -> downscale -> colour noise -> JPEG -> resize back."""
    p = face_params(rng)
    h, w, _ = img.shape
    x = filter2d(img, p["kernel"])
    # max(1, .): OpenCV would raise on a zero size, reached only for images under 8 px
    x = resize_linear(x, max(1, int(w // p["scale"])), max(1, int(h // p["scale"])))
    noise = rng.standard_normal(x.shape, dtype=np.float32) * p["noise_sigma"] / 255.0  # colour noise
    x = np.clip(x + noise, 0, 1)
    x = jpeg(x, p["quality"])
    return resize_linear(x, w, h)


# ---------------------------------------------------------------------------------------------------------
# our own models for the other seven tasks


def _streak(length, width, angle):
    """Peak-1 kernel of a segment `length` px long at `angle` (radians from +x, y down), with a Gaussian
    profile of std `width` across it and at its ends (a soft capsule). length 0 gives a round blob."""
    r = int(math.ceil(length / 2 + 3 * width))
    ax = np.arange(-r, r + 1.0)
    xx, yy = np.meshgrid(ax, ax)  # [2r+1, 2r+1] each
    along = xx * math.cos(angle) + yy * math.sin(angle)
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    beyond = np.maximum(np.abs(along) - length / 2, 0)  # distance past the segment's ends
    return np.exp(-0.5 * (across ** 2 + beyond ** 2) / width ** 2)


def _disk(radius):
    """Defocus kernel: a uniform disk with a one-pixel antialiased rim, summing to 1."""
    r = int(math.ceil(radius + 1))
    ax = np.arange(-r, r + 1.0)
    kernel = np.clip(radius + 0.5 - np.hypot(*np.meshgrid(ax, ax)), 0, 1)
    return kernel / kernel.sum()


def _particles(h, w, rng, density, kernel):
    """A layer in [0, 1]: drops at random pixels (probability `density`, brightness U[0.5, 1]), each drawn
    as `kernel`. Drops lie inside the frame only (zero padding): a streak near the border may be cut."""
    drops = (rng.random((h, w)) < density) * rng.uniform(0.5, 1.0, (h, w))  # [H, W]
    return np.clip(signal.fftconvolve(drops, kernel, mode="same"), 0, 1).astype(np.float32)


def deblur(img, rng):
    """Camera blur, p 0.5/0.5: linear motion (length U[5, 25] px, any direction) or defocus (radius
    U[1.5, 6] px), as in GoPro-like motion and out-of-focus photos."""
    if rng.random() < 0.5:
        kernel = _streak(rng.uniform(5, 25), 0.5, rng.uniform(0, math.pi))
    else:
        kernel = _disk(rng.uniform(1.5, 6))
    return filter2d(img, kernel / kernel.sum())


def derain(img, rng):
    """Rain: 1-3 layers of sparse drops smeared into thin streaks (length U[10, 40] px, a shared slant
    within 20 degrees of vertical), screen-blended: 1 - (1 - J)(1 - S), so rain only adds light."""
    h, w, _ = img.shape
    slant = math.pi / 2 + rng.uniform(-0.35, 0.35)
    out = img
    for _ in range(rng.integers(1, 4)):
        kernel = _streak(rng.uniform(10, 40), rng.uniform(0.4, 1.0), slant + rng.normal(0, 0.03))
        streaks = _particles(h, w, rng, rng.uniform(0.0005, 0.003), kernel) * rng.uniform(0.3, 0.8)
        out = 1 - (1 - out) * (1 - streaks[..., None])
    return out


def desnow(img, rng):
    """Snow: a faint white veil (0-15 %), then 2-3 depth layers of flakes, far ones small and dense, near
    ones large and sparse, each a soft blob of std U[0.6, 3.5] px stretched by up to twice that along the
    fall direction, alpha-blended as opaque near-white flakes."""
    h, w, _ = img.shape
    fall = math.pi / 2 + rng.uniform(-0.5, 0.5)
    veil = rng.uniform(0, 0.15)
    out = img * (1 - veil) + veil
    for size in np.sort(rng.uniform(0.6, 3.5, rng.integers(2, 4))):  # far to near
        kernel = _streak(size * rng.uniform(0, 2), size, fall)
        # density ~ 1 / area: each layer covers about the same fraction of the frame
        flakes = _particles(h, w, rng, 0.004 / size ** 2, kernel)[..., None]  # [H, W, 1]
        out = out * (1 - flakes) + flakes * rng.uniform(0.85, 1.0)
    return out


def lowlight(img, rng):
    """Low light: linearise (gamma 2.2), expose at U[2, 15] % of the light, then a Poisson-Gaussian sensor:
    shot noise for a full well of U[200, 2000] electrons at white, plus Gaussian read noise (std U[0.1, 0.5] %
    of white), and gamma-encode again. Dark, grainy, with colour noise in the shadows, like LOL's pairs."""
    exposure = rng.uniform(0.02, 0.15)
    full_well = rng.uniform(200, 2000)  # electrons at white: fewer -> stronger shot noise
    signal_e = img.astype(np.float64) ** 2.2 * exposure * full_well  # expected electrons per pixel
    raw = rng.poisson(signal_e) / full_well + rng.normal(0, rng.uniform(0.001, 0.005), img.shape)
    return (np.clip(raw, 0, 1) ** (1 / 2.2)).astype(np.float32)


def dehaze(img, rng):
    """Haze by the atmospheric scattering model (Koschmieder; as in RESIDE): I = J t + A (1 - t),
    t = exp(-beta d), beta U[0.5, 2], bright near-grey airlight A. No depth map, so a proxy d in
    [0.1, 1]: far at the top of the frame, near at the bottom (a ground-plane scene), with a smooth random
    field (a bilinearly enlarged 4x4 grid) so the haze is uneven."""
    h, w, _ = img.shape
    rows = np.linspace(1, 0, h, dtype=np.float32)[:, None]  # [H, 1]: 1 at the top (far)
    field = resize_linear(rng.random((4, 4, 1), dtype=np.float32), w, h)[..., 0]  # [H, W]
    depth = 0.1 + 0.9 * (0.7 * rows + 0.3 * field)
    t = np.exp(-rng.uniform(0.5, 2.0) * depth)[..., None]  # [H, W, 1] transmission
    airlight = np.clip(rng.uniform(0.75, 1.0) + rng.uniform(-0.03, 0.03, 3), 0, 1).astype(np.float32)
    return img * t + airlight * (1 - t)


def highlight(img, rng):
    """Specular highlights by the dichromatic reflection model, I = D + m_s L: the photo is the diffuse
    part D; m_s is 2-8 glossy lobes (anisotropic Gaussians, 0.5-5 % of the short side, peak U[1.5, 4])
    in a near-white light colour L, clipped as a camera saturates: flat white cores, a short falloff."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # [H, W] each
    spec = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(2, 9)):
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        major = rng.uniform(0.005, 0.05) * min(h, w)
        minor = major * rng.uniform(0.3, 1.0)
        a = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)  # along the lobe's major axis
        v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        spec += rng.uniform(1.5, 4.0) * np.exp(-0.5 * ((u / major) ** 2 + (v / minor) ** 2))
    light = rng.uniform(0.9, 1.0, 3).astype(np.float32)  # L: near-white
    return np.clip(img + spec[..., None] * light, 0, 1)


def demoire(img, rng):
    """Moire of a photographed screen. The screen's RGB subpixel grid is a cosine stripe per channel (phases
    1/3 apart) times a fainter row pattern, with a frequency f of 1 +- U[0.01, 0.08] cycles per camera pixel,
    rotated by up to 3 degrees and bent by radial lens distortion. The camera point-samples it at its pixel
    grid, below Nyquist, so the grid aliases into broad coloured bands (frequency about |f - 1|: periods of
    12-100 px near the centre) that curve and tighten with the distortion; the photo is modulated by them
    (strength U[0.2, 0.6])."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # [H, W] each
    x, y = xx - (w - 1) / 2, yy - (h - 1) / 2  # from the optical centre
    bend = 1 + rng.uniform(-0.15, 0.15) * (x ** 2 + y ** 2) / (max(h, w) / 2) ** 2  # radial distortion
    f = 1 + rng.choice([-1, 1]) * rng.uniform(0.01, 0.08)
    a = rng.uniform(-0.05, 0.05)
    u = f * bend * (x * math.cos(a) - y * math.sin(a))  # screen coordinates, in screen pixels
    v = f * bend * (x * math.sin(a) + y * math.cos(a))
    phase = rng.uniform(0, 1)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * (u[..., None] + phase - np.arange(3) / 3))  # [H, W, 3] R,G,B
    grid = stripes * (0.75 + 0.25 * np.cos(2 * np.pi * v))[..., None] / 0.375  # mean 1
    strength = rng.uniform(0.2, 0.6)
    return np.clip(img * (1 - strength + strength * grid), 0, 1).astype(np.float32)


# task -> function(image float32 [H, W, 3] in [0, 1], numpy Generator) -> float [H, W, 3] in [0, 1]
DEGRADATIONS = {
    "derain": derain, "desnow": desnow, "lowlight": lowlight, "dehaze": dehaze,
    "deblur": deblur, "highlight": highlight, "face": face, "demoire": demoire,
}


def degrade(task, image, seed):
    """Degraded copy of a PIL image for `task`, RGB uint8, same size, a pure function of (task, image, seed).

    seed: anything numpy.random.default_rng takes, e.g. an int or a tuple (run_seed, epoch, index).
    """
    if task not in DEGRADATIONS:
        raise ValueError(f"unknown degradation task {task!r}; known tasks: {', '.join(DEGRADATIONS)}")
    rng = np.random.default_rng(seed)
    img = (np.asarray(image.convert("RGB")) / 255.0).astype(np.float32)  # [H, W, 3], as dataset.py l.84
    out = DEGRADATIONS[task](img, rng)
    return Image.fromarray((out * 255.0).round().clip(0, 255).astype(np.uint8))  # as dataset.py l.113
