"""UniPC as Diff-Plugin ran it (diffusers 0.17 via the SD-1.4 PNDM config): timesteps, predictor/corrector
orders, where the last step lands, and the official loop's re-noising of the latent between steps (facts 1.2,
1.3).

Run: python -m pytest tests/test_unipc.py -q -s   (about 2 s)
"""
import pytest
import torch

from helpers import assert_close
from minidiff.diffusion.schedulers import alphas_cumprod, make_sampler
from test_schedulers import MU, SD15_SCHEDULER_CONFIG, TOL, fake_eps


def test_unipc_timesteps_as_diffusers_017():
    assert make_sampler("unipc", 20).timesteps.tolist() == [
        999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert make_sampler("unipc", 3).timesteps.tolist() == [999, 666, 333]  # the chained plugins' 3 steps


def test_unipc_orders():
    """Predictor orders 1, 2, ..., 2, 1 (warm-up, lower_order_final); the corrector at step i uses the order
    of the predictor of step i-1 and runs at every step i > 0."""
    s, x = make_sampler("unipc", 20), torch.randn(2, 4, 8, 8)
    predictor, corrected = [], []
    for i, t in enumerate(s.timesteps):
        corrected.append(s.last_x is not None)
        x = s.step(fake_eps(x, t), i, x)
        predictor.append(s.last_order)
    assert predictor == [1] + [2] * 18 + [1]
    assert corrected == [False] + [True] * 19
    s = make_sampler("unipc", 2)
    for i, t in enumerate(s.timesteps):
        x = s.step(fake_eps(x, t), i, x)
        assert s.last_order == 1


def test_exact_model_lands_on_final_level():
    """With the exact eps of a one-point data set MU (eps = (x_t - alpha_t MU) / sigma_t) every deterministic
    sampler stays on the trajectory alpha_t MU + sigma_t n; the final level tells where each sampler ends:
    DDIM and UniPC at t=0's level acp[0] (sigma ~ 0.029), DPM-Solver++ and Euler at sigma = 0."""
    n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    acp0 = alphas_cumprod()[0]
    for name, final in [("ddim", acp0), ("unipc", acp0), ("dpmpp2m", 1.0), ("euler", 1.0)]:
        for steps in (1, 3, 20):
            s = make_sampler(name, steps)
            # alpha_t at step i; Euler's (fractional) level: 1 / sqrt(1 + sigma^2), its x = DDPM x / alpha
            acp = [1 / (1 + s.sigmas[i] ** 2) if name == "euler" else alphas_cumprod()[int(t)]
                   for i, t in enumerate(s.timesteps)]
            alpha = [a.sqrt() for a in acp]
            x = alpha[0] * MU + (1 - alpha[0] ** 2).sqrt() * n  # on the trajectory at the first level
            x = x / alpha[0] if name == "euler" else x
            for i, a in enumerate(alpha):
                x = s.step((s.scale_model_input(x, i) - a * MU) / (1 - a * a).sqrt(), i, x)
            final = torch.as_tensor(final)
            # 1e-4: the x0 prediction at t=999 divides by alpha = 0.068, amplifying float32 rounding ~15x
            assert_close(x, final.sqrt() * MU + (1 - final).sqrt() * n, 1e-4, f"{name} {steps}")


@pytest.mark.parity
def test_unipc_renoise_between_steps_and_final_sigma():
    """Diff-Plugin's loop overwrites the latent by add_noise(cond, noise, t) at every t >= 960, keeping the
    scheduler's history (50 steps: t=999 and t=979). Same with diffusers; "sigma_min" and "zero" differ."""
    diffusers = pytest.importorskip("diffusers")
    cls = diffusers.UniPCMultistepScheduler
    ref, zero = (cls.from_config(SD15_SCHEDULER_CONFIG, final_sigmas_type=f) for f in ("sigma_min", "zero"))
    ref.set_timesteps(50)
    zero.set_timesteps(50)
    mine = make_sampler("unipc", 50)
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_ref = x_mine = x_zero = None
    for i, t in enumerate(ref.timesteps):
        if t >= 960:  # the official re-noise rule (facts 1.3)
            x_ref = x_mine = x_zero = ref.add_noise(cond, noise, t.reshape(1))
        x_ref = ref.step(fake_eps(x_ref, t), t, x_ref).prev_sample
        x_zero = zero.step(fake_eps(x_zero, t), t, x_zero).prev_sample
        x_mine = mine.step(fake_eps(x_mine, t), i, x_mine)
        assert_close(x_mine, x_ref, TOL, f"unipc re-noise i={i}")
    # the last step differs by about sigma_0 * eps ~ 0.03: diffusers' default is not Diff-Plugin's UniPC
    assert (x_zero - x_ref).abs().max() > 1e-3
