"""DDIM inversion round trip (issue 3, item 3): invert a latent with DDIMInverse(N), reconstruct it with
DDIM(N), and assert a bound derived below (not a number tuned until it passes).
Run: python -m pytest tests/test_inversion.py -q -s   (about 10 s; prints error and bound per step count)

Derivation. Inversion and reconstruction visit the same levels L_0 = acp[0], L_{k+1} = acp[timesteps[k]]
(timesteps 1, 1+r, ..., r = 1000 // N). DDIM's step from level k+1 down to k with model output e is the
affine map D_k(y, e) = rho_k y + c_k e, with rho_k = sqrt(L_k / L_{k+1}) >= 1 and
c_k = sqrt(1 - L_k) - rho_k sqrt(1 - L_{k+1}); DDIMInverse's step k is exactly its inverse for the same e
(both use the same float32 alpha/sigma values). Both evaluate the model at the same timestep
t = timesteps[k], the inversion at x_k, the reconstruction at y_{k+1}. With e_k = eps(x_k, t),
e'_k = eps(y_{k+1}, t) and d_k = max|y_k - x_k| (d_N = 0):
    y_k - x_k = rho_k (y_{k+1} - x_{k+1}) + c_k (e'_k - e_k)    =>    d_k <= rho_k d_{k+1} + |c_k| E_k,
with E_k = max|e'_k - e_k|. Three eps models:
  1. constant eps: E_k = 0, the round trip is exact; only float32 rounding remains (bound R below);
  2. affine eps = lam * x + b(t), elementwise, Lipschitz lam in the max norm: E_k <= lam (d_{k+1} + D_k)
     with D_k = max|x_{k+1} - x_k| (inversion path): an a-priori bound from the inversion alone;
  3. a tiny random UNet on a real photo's latent (tiny VAE): no Lipschitz constant is known, so E_k is
     measured (both outputs are computed anyway) and the recursion is checked a posteriori.
Rounding R: each step (x0 = (x - sigma e) / alpha, then alpha' x0 + sigma' e) errs by at most
9u (|x| + |e|) / alpha (u = 2^-24; about 9 roundings, each relative to a value <= (|x| + |e|) / alpha); an
error made at level k reaches level 0 multiplied by sqrt(L_0 / L_k) (each DDIM step down multiplies by rho).
R sums both directions over all steps and is added to the bounds of cases 2 and 3. A level bug (e.g. the
first inversion step starting from acp = 1 instead of acp[0]) breaks case 1 by 1e-1 against a bound of 1e-5.
"""
import math

import numpy as np
import PIL.Image
import torch

from minidiff.diffusion.schedulers import DDIMInverse, alphas_cumprod, make_sampler

STEPS = [1, 2, 10, 20, 50]
U = 2.0 ** -24  # float32 unit roundoff


def round_trip(eps_fn, x0, steps):
    """Invert x0, reconstruct; return (max|y0 - x0|, bound, rounding part), the bound of the docstring."""
    inv, ddim = DDIMInverse(steps), make_sampler("ddim", steps)
    assert ddim.timesteps.tolist() == inv.timesteps.flip(0).tolist()  # the same levels, walked back
    acp = alphas_cumprod().double()
    L = [acp[0].item()] + [acp[int(t)].item() for t in inv.timesteps]
    xs, es = [x0], []
    for i, t in enumerate(inv.timesteps):  # up: level i -> i+1, model at t = timesteps[i]
        es.append(eps_fn(xs[-1], t))
        xs.append(inv.step(es[-1], i, xs[-1]))
    y, d, rounding, lam = xs[-1], 0.0, 0.0, getattr(eps_fn, "lam", None)
    for j, t in enumerate(ddim.timesteps):  # down: level k+1 -> k
        k = steps - 1 - j
        e = eps_fn(y, t)
        rho = math.sqrt(L[k] / L[k + 1])
        c = abs(math.sqrt(1 - L[k]) - rho * math.sqrt(1 - L[k + 1]))
        if lam is not None:  # case 2: a-priori, from the inversion path only
            E = lam * (d + (xs[k + 1] - xs[k]).abs().max().item())
        else:  # cases 1 and 3: measured mismatch of the two model outputs
            E = (e - es[k]).abs().max().item()
        d = rho * d + c * E
        up = (xs[k].abs().max() + es[k].abs().max()).item() / math.sqrt(L[k]) * math.sqrt(L[0] / L[k + 1])
        down = (y.abs().max() + e.abs().max()).item() / math.sqrt(L[k + 1]) * math.sqrt(L[0] / L[k])
        rounding += 9 * U * (up + down)
        y = ddim.step(e, j, y)
    return (y - x0).abs().max().item(), d + rounding, rounding


def photo_latent():
    """A real photo (examples/, public domain) at 16x16, encoded by the tiny random VAE (2x downsampling):
    posterior mean x 0.18215, [1, 4, 8, 8]."""
    from pathlib import Path
    from minidiff.models.vae import LATENT_SCALE, TINY_VAE, AutoencoderKL
    path = Path(__file__).resolve().parents[1] / "examples" / "astronaut-lowlight.jpg"
    img = PIL.Image.open(path).convert("RGB").resize((16, 16), PIL.Image.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].contiguous()
    torch.manual_seed(0)
    with torch.no_grad():
        mean, _ = AutoencoderKL(TINY_VAE).eval().encode(x)  # [1, 4, 8, 8]
    return LATENT_SCALE * mean


def report(name, results):
    for steps, (err, bound, rounding) in results.items():
        print(f"INVERSION {name:9s} steps={steps:2d}: max|x0 - DDIM(DDIMInverse(x0))| {err:.3e}  "
              f"bound {bound:.3e}  (rounding part {rounding:.1e})")
        assert err <= bound, f"{name} steps={steps}: round-trip error {err:.3e} > bound {bound:.3e}"


def test_constant_eps_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    results = {n: round_trip(lambda x, t: eps, x0, n) for n in STEPS}
    report("constant", results)
    for err, bound, rounding in results.values():
        assert err <= rounding  # E_k = 0: the only error left is float32 rounding


def test_affine_eps_round_trip_within_lipschitz_bound():
    g = torch.Generator().manual_seed(1)
    x0, pattern = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)

    def eps_fn(x, t):
        return 0.5 * x + 0.3 * torch.sin(pattern + float(t) / 100.0)
    eps_fn.lam = 0.5  # the Lipschitz constant in the max norm (elementwise map)
    report("affine", {n: round_trip(eps_fn, x0, n) for n in STEPS})


def test_tiny_unet_photo_round_trip():
    from dataclasses import replace
    from minidiff.models.unet import TINY_UNET, UNet
    x0 = photo_latent()
    torch.manual_seed(1)
    cfg = replace(TINY_UNET, channel_mult=(1, 2), num_res_blocks=1)  # two levels: 2N calls stay cheap
    unet = UNet(cfg).eval()
    context = torch.randn(1, 8, cfg.context_dim)

    def eps_fn(x, t):
        with torch.no_grad():
            return unet(x, t, context)
    # A random UNet is no denoiser: its eps moves a lot between x_k and y_{k+1}, and DDIM's steps down
    # amplify by rho_k (up to 1/sqrt(acp[999]) = 14.6 in all), so the round trip is far from exact; the
    # bound, built from the measured mismatches, must still hold at every step count.
    report("tiny UNet", {n: round_trip(eps_fn, x0, n) for n in STEPS})
