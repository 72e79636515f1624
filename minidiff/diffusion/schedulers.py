"""Noise schedule of Stable Diffusion 1.x and the samplers that walk it backwards (and forwards: inversion).

Forward process (DDPM, Ho et al. 2020):  x_t = alpha_t * x0 + sigma_t * eps,  eps ~ N(0, I),
with alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]), t = 0 .. 999. The UNet
predicts eps from (x_t, t). Every sampler below turns that prediction into a step to a lower noise level:
  DDPM         ancestral sampling of the posterior q(x_prev | x_t, x0)        (Ho et al. 2020, eq. 6-7)
  DDIM         deterministic eta=0 update, optionally re-noised with eta       (Song et al. 2021, eq. 12)
  DDIMInverse  the DDIM update run from clean to noisy (latent -> noise)       (Mokady et al. 2023)
  UniPC        multistep predictor-corrector, bh2, order 2, data prediction    (Zhao et al. 2023)
  DPMSolverPP  DPM-Solver++(2M), the multistep second-order solver            (Lu et al. 2022)
  Euler        Euler's method on the probability-flow ODE in sigma = sigma_t / alpha_t  (Karras et al. 2022)

Each sampler reproduces, step for step, what diffusers v0.35.2 gives for `<Scheduler>.from_config(SD-1.5
scheduler config)` (src/diffusers/schedulers/scheduling_{ddpm,ddim,ddim_inverse,unipc_multistep,
dpmsolver_multistep,euler_discrete}.py), except UniPC, which keeps diffusers v0.17.0's behaviour that
Diff-Plugin was run with: the last step lands on t=0's noise level instead of zero noise (= current
diffusers' final_sigmas_type="sigma_min").

Usage: s = make_sampler("ddim", 50); x = noise * s.init_noise_sigma; for i, t in enumerate(s.timesteps):
eps = unet(s.scale_model_input(x, i), t, ...); x = s.step(eps, i, x). One sampler object per sampling run:
the multistep samplers keep their own history of earlier model outputs.

Why step objects and not k-diffusion's one function per sampler (`sample_euler(model, x, sigmas)`, which owns
the loop): the loop belongs to the callers here, and they do things between steps that such a function
would have to hide behind callbacks. Diff-Plugin's loop (plugin.py) overwrites the latent with a re-noised
input at every t >= 960 while UniPC keeps its history of predictions, and feeds the UNet SCB residuals;
img2img starts in the middle of the schedule; the parity tests compare every intermediate latent with
diffusers' `scheduler.step`. Each step() is still short and self-contained, and the hardest one, UniPC's,
is written out step by step below.

Precision: each sampler keeps the dtype handling of the diffusers scheduler it reproduces, so that a
half-precision run gives diffusers' latents too. Schedule values (alpha_t, sigma_t, ...) are float32 0-d
tensors; multiplying a half tensor by one keeps the half dtype and, on the CPU, rounds once in float32.
  DDPM, DDIM, DDIMInverse, UniPC   update in the model's dtype (diffusers does not upcast them)
  DPMSolverPP, Euler               update in float32, result cast back to the model's dtype (diffusers
                                   upcasts the sample: `sample.to(torch.float32)` in their step())
add_noise casts alphas_cumprod to the latent's dtype first, as diffusers' add_noise does.
"""
import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000        # T of the SD-1.x training run
BETA_START, BETA_END = 0.00085, 0.012  # "scaled_linear": betas linear in sqrt-space between these two


def alphas_cumprod():
    """alphas_cumprod[t] = prod_{s<=t} (1 - beta_s), float32 [1000], computed exactly as diffusers does."""
    # linspace in float32 then square (not a float64 linspace): the last bits matter for 1e-5 parity.
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _at(values, t, like):
    """values[t] for an int or a [B] tensor of timesteps, shaped to broadcast against `like` [B, ...]."""
    v = values.to(device=like.device, dtype=like.dtype)[torch.as_tensor(t, device=like.device)]
    return v.reshape(-1, *([1] * (like.dim() - 1)))  # [B or 1, 1, 1, 1]


def add_noise(x0, noise, t):
    """Forward process q(x_t | x0): alpha_t * x0 + sigma_t * noise (training inputs, img2img start)."""
    acp = _at(alphas_cumprod(), t, x0)
    return acp ** 0.5 * x0 + (1 - acp) ** 0.5 * noise


def predict_x0(x, eps, t):
    """The clean latent implied by an eps prediction: x0 = (x_t - sigma_t * eps) / alpha_t.

    t: one timestep (the samplers; alpha_t, sigma_t stay float32 0-d tensors, see Precision above) or a [B]
    tensor of timesteps (training; the values are cast to x's dtype and broadcast over [B, ...]).
    """
    acp = alphas_cumprod()[int(t)] if torch.as_tensor(t).dim() == 0 else _at(alphas_cumprod(), t, x)
    return (x - (1 - acp) ** 0.5 * eps) / acp ** 0.5


def randn_tensor(shape, generator, dtype, device):
    """N(0, I) noise as diffusers' randn_tensor draws it: on the generator's device (the pipelines seed a CPU
    generator, so a seed gives the same noise on every device), in `dtype`, then moved to `device`."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def _leading(steps, offset=1):
    """SD's "leading" spacing, steps_offset=1: t = k * (1000 // steps) + 1, k = steps-1 .. 0 (50: 981..1)."""
    return torch.arange(steps - 1, -1, -1, dtype=torch.int64) * (NUM_TRAIN_TIMESTEPS // steps) + offset


def _linspace(steps):
    """UniPC / DPM-Solver "linspace" spacing: round(linspace(0, 999, steps+1)) reversed, final 0 dropped."""
    t = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    _, first = np.unique(t, return_index=True)  # keep order, drop repeats (only possible for steps >= 1000)
    return torch.from_numpy(t[np.sort(first)].copy())


class Sampler:
    """Shared defaults: unit initial noise, identity input scaling, img2img start by the forward process."""
    init_noise_sigma = 1.0

    def scale_model_input(self, x, i):
        return x

    def add_noise_at(self, x0, noise, i):
        """Noisy start for img2img at timesteps[i] (the image latent pushed to that noise level)."""
        return add_noise(x0, noise, self.timesteps[i])


class DDPM(Sampler):
    """Ancestral sampling: draw x_prev from the Gaussian posterior q(x_prev | x_t, x0 = predicted x0)."""

    def __init__(self, steps):
        self.timesteps = _leading(steps)
        self.alphas_cumprod = alphas_cumprod()

    def step(self, eps, i, x, generator=None):
        t = self.timesteps[i]
        prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
        acp_t = self.alphas_cumprod[t]
        acp_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)  # past the end: clean
        alpha = acp_t / acp_prev      # alpha of the whole jump t -> prev (a product of 1000/steps betas)
        beta = 1 - alpha
        x0 = predict_x0(x, eps, t)
        # Posterior mean (Ho et al. eq. 7): a blend of the predicted x0 and the current sample.
        mean = ((acp_prev ** 0.5 * beta / (1 - acp_t)) * x0
                + (alpha ** 0.5 * (1 - acp_prev) / (1 - acp_t)) * x)
        if t == 0:
            return mean
        # "fixed_small" variance beta_tilde = (1 - acp_prev) / (1 - acp_t) * beta, clamped as diffusers does.
        var = torch.clamp((1 - acp_prev) / (1 - acp_t) * beta, min=1e-20)
        noise = randn_tensor(eps.shape, generator, eps.dtype, eps.device)  # one fresh draw per step
        return mean + var ** 0.5 * noise


class DDIM(Sampler):
    """DDIM: x_prev = alpha_prev * x0 + sqrt(sigma_prev^2 - std^2) * eps + std * noise,
    std = eta * (DDPM posterior std)."""

    def __init__(self, steps, eta=0.0):
        self.timesteps = _leading(steps)
        self.ratio = NUM_TRAIN_TIMESTEPS // steps
        self.eta = eta
        self.alphas_cumprod = alphas_cumprod()

    def step(self, eps, i, x, generator=None):
        t = int(self.timesteps[i])
        prev = t - self.ratio
        acp_t = self.alphas_cumprod[t]
        # set_alpha_to_one=False: the step after t=1 lands on acp[0] (t=0's level), not on a clean 1.0.
        acp_prev = self.alphas_cumprod[prev] if prev >= 0 else self.alphas_cumprod[0]
        x0 = predict_x0(x, eps, t)
        # eta interpolates between DDIM (0) and DDPM's posterior noise (1), Song et al. eq. 16.
        std = self.eta * ((1 - acp_prev) / (1 - acp_t) * (1 - acp_t / acp_prev)) ** 0.5
        x_prev = acp_prev ** 0.5 * x0 + (1 - acp_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * randn_tensor(eps.shape, generator, eps.dtype, eps.device)
        return x_prev


class DDIMInverse(Sampler):
    """DDIM run backwards (image latent -> noise), as diffusers' DDIMInverseScheduler with SD's config.

    DDIM's eta=0 step is a deterministic map between two noise levels that keeps the predicted (x0, eps)
    pair: x_s = alpha_s * x0 + sigma_s * eps. Inversion applies the same map from the lower level s to the
    higher level t: x0 = (x_s - sigma_s * eps) / alpha_s, then x_t = alpha_t * x0 + sigma_t * eps. The
    timesteps ascend (1, 1+r, ..., 1+(N-1)r with r = 1000 // N); step i moves from s = timesteps[i] - r
    (acp[0] when s < 0, as set_alpha_to_one=False) up to t = timesteps[i], with eps evaluated by the UNet AT
    t (the target level) on the sample still at level s. DDIM(N) then walks the same levels down, so with
    an eps that does not depend on (x, t) the round trip is exact; with a real UNet each step contributes
    eps(x_s, t) - eps(x_t, t) (tests/test_inversion.py bounds the sum).
    """

    def __init__(self, steps):
        self.ratio = NUM_TRAIN_TIMESTEPS // steps
        self.timesteps = torch.arange(steps, dtype=torch.int64) * self.ratio + 1
        self.alphas_cumprod = alphas_cumprod()

    def step(self, eps, i, x, generator=None):
        t = int(self.timesteps[i])
        s = max(min(t - self.ratio, NUM_TRAIN_TIMESTEPS - 1), 0)  # the level x is at now (acp[0] below 0)
        acp_t = self.alphas_cumprod[t]
        x0 = predict_x0(x, eps, s)
        return acp_t ** 0.5 * x0 + (1 - acp_t) ** 0.5 * eps


class _ExponentialIntegrator(Sampler):
    """Shared tables of the multistep ODE solvers: alpha, sigma and log-SNR lambda = log(alpha / sigma)
    at the N timesteps plus one final level (index N) that the last step lands on.

    In data-prediction form the probability-flow ODE has the exact solution (DPM-Solver++ eq. 9)
        x_t = sigma_t / sigma_s * x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda,
    and with h = lambda_t - lambda_s and x0 held constant this is the DDIM step
        x_t = sigma_t / sigma_s * x_s - alpha_t * (e^-h - 1) * x0.
    Higher orders replace "x0 constant" by a line through the earlier predictions x0 (stored in self.x0s).
    """

    def __init__(self, steps, final_acp):
        self.timesteps = _linspace(steps)
        acp = torch.cat([alphas_cumprod()[self.timesteps], final_acp.reshape(1)])  # [N+1]
        self.alpha, self.sigma = acp ** 0.5, (1 - acp) ** 0.5
        self.lam = torch.log(self.alpha) - torch.log(self.sigma)  # +inf where sigma = 0
        self.x0s = []  # [(step index, x0 prediction)] of this run, newest last

    def data_prediction(self, eps, i, x):
        """x0 at step i (the solvers integrate in data-prediction form: x0, not eps, is their model)."""
        return predict_x0(x, eps, self.timesteps[i])


class UniPC(_ExponentialIntegrator):
    """UniPC (Zhao et al. 2023): bh2, order 2, data prediction, lower order at the start and at the final
    step, as diffusers 0.17 ran it for Diff-Plugin. The last step targets t=0's level acp[0]
    (sigma_t ~ 0.0292), not zero noise.

    Per step i, with the model's x0_i at the sample x_i the previous step predicted:
      1. UniC (corrector, from step 1 on): redo step i-1 -> i from the same start, now also using x0_i at
         its end point. x0_i itself is kept: the model is not run again at the corrected sample, which is
         what makes the corrector free (one model call per step, as the predictor alone).
      2. UniP (predictor): step i -> i+1 from the corrected sample, with the predictions x0_i, x0_{i-1}.

    The update integrates the exact solution above, written with u = lambda - lambda_s in [0, h], as
        x_t = sigma_t / sigma_s * x_s + alpha_t * integral_0^h e^-(h - u) x0(lambda_s + u) du,
    with x0 a polynomial in u:
      - x0 held at m0 = x0(lambda_s): the integral is (1 - e^-h) m0, the DDIM step (_first_order).
      - a slope: x0 = m0 + (u / h) D + ..., D = h * dx0/dlambda, estimated from another prediction m at
        lambda_s + r h (r < 0: an earlier level, r = 1: the end point t) as D ~ (m - m0) / r (_slope).
        UniPC writes the higher-order part as  - alpha_t * B(h) * sum_m rho_m * D_m,  where each Taylor term
        (u / h)^k of x0 has the exact weight integral_0^h e^-(h - u) (u / h)^k du = -B(h) * b_k, and
        the rho solve sum_m rho_m r_m^(k-1) = b_k, k = 1 .. (number of slopes) (UniPC eq. 8).
      - "bh2": B(h) = e^-h - 1 (negative; the DDIM weight above is -B(h)). Where rho is solved, B(h) cancels;
        it matters where diffusers fixes rho = 1/2 (order-2 predictor, order-1 corrector): 1/2 is b_1's
        limit for h -> 0, and with it UniP-2 is exactly DPM-Solver++(2M)'s update.
    """

    def __init__(self, steps):
        super().__init__(steps, alphas_cumprod()[0])
        self.last_x, self.last_order = None, None  # corrected sample the previous predictor started from

    def _first_order(self, x, s, t):
        """The DDIM step from level s (sample x, newest prediction m0) to t, and h, B(h) for the rest."""
        h = self.lam[t] - self.lam[s]  # step length in log-SNR
        B_h = torch.expm1(-h)  # e^-h - 1, exactly (expm1 keeps the digits a small h would lose)
        m0 = self.x0s[-1][1]
        return self.sigma[t] / self.sigma[s] * x - self.alpha[t] * B_h * m0, h, B_h

    def _slope(self, s, h):
        """D1 = (m1 - m0) / r1 from the two stored predictions (m1 at level s1 before s), and r1 < 0."""
        (s1, m1), (_, m0) = self.x0s[-2:]
        r1 = (self.lam[s1] - self.lam[s]) / h  # where s1 lies, in units of this step: negative
        return (m1 - m0) / r1, r1

    def _predict(self, x, s, order):
        """UniP: sample at level s+1 from x at s. Order 2 adds the slope D1 with the fixed rho = 1/2."""
        t = s + 1
        x_t, h, B_h = self._first_order(x, s, t)
        if order == 1:
            return x_t
        D1, _ = self._slope(s, h)
        return x_t - self.alpha[t] * B_h * 0.5 * D1

    def _correct(self, x, s, order, x0_t):
        """UniC: the step s -> s+1 from x again, adding the slope to the new prediction x0_t at the end."""
        t = s + 1
        x_t, h, B_h = self._first_order(x, s, t)
        Dt = x0_t - self.x0s[-1][1]  # slope to the end point (r = 1): x0_t - m0
        if order == 1:  # one slope: diffusers' fixed rho = 1/2
            return x_t - self.alpha[t] * B_h * (0.5 * Dt)
        D1, r1 = self._slope(s, h)
        # Weights b_1, b_2 of the Taylor terms u/h and (u/h)^2 (see the class docstring): with hh = -h,
        # phi_1 = B(h) = e^hh - 1 and the recurrence phi_{k+1} = phi_k / hh - 1/k!, b_k = k! phi_{k+1} / B(h).
        hh = -h
        phi_2 = B_h / hh - 1
        b1 = phi_2 / B_h
        b2 = 2 * (phi_2 / hh - 0.5) / B_h
        # Two slopes at r = (r1, 1): rho0 + rho1 = b1 and r1 rho0 + rho1 = b2, solved in closed form
        # (diffusers calls torch.linalg.solve: the ~1e-6 relative difference the parity tests allow).
        rho0 = (b1 - b2) / (1 - r1)
        rho1 = b1 - rho0
        return x_t - self.alpha[t] * B_h * (rho0 * D1 + rho1 * Dt)

    def step(self, eps, i, x, generator=None):
        x0 = self.data_prediction(eps, i, x)  # from the sample BEFORE correction (diffusers order)
        if self.last_x is not None:  # 1. UniC: redo step i-1 -> i, now with x0 at its end point
            x = self._correct(self.last_x, i - 1, self.last_order, x0)
        self.x0s = self.x0s[-1:] + [(i, x0)]
        # Warm-up: order 1 until two predictions exist; lower_order_final: order 1 for the last step.
        order = min(2, len(self.timesteps) - i, len(self.x0s))
        self.last_x, self.last_order = x, order
        return self._predict(x, i, order)  # 2. UniP: step i -> i+1


class DPMSolverPP(_ExponentialIntegrator):
    """DPM-Solver++(2M), "midpoint" form, ending at zero noise (diffusers' defaults).

    It equals UniPC's predictor alone (UniP-2 with B(h) = e^-h - 1 and rho = 1/2 is this update); no
    corrector. The first step is order 1 (no history yet), and so is the last: its target sigma = 0 has
    lambda = inf, e^-h = 0, so x = x0.
    """

    def __init__(self, steps):
        super().__init__(steps, torch.tensor(1.0))  # acp = 1: sigma = 0, a clean sample

    def step(self, eps, i, x, generator=None):
        x0 = self.data_prediction(eps, i, x)  # in the model's dtype, as diffusers
        x = x.float()  # the update runs in float32; the result goes back to the model's dtype
        self.x0s = self.x0s[-1:] + [(i, x0)]
        if i == len(self.timesteps) - 1:  # sigma_t = 0: the first-order update returns x0 exactly
            return x0.to(eps.dtype)
        t = i + 1
        h = self.lam[t] - self.lam[i]
        x_t = (self.sigma[t] / self.sigma[i]) * x - (self.alpha[t] * (torch.exp(-h) - 1.0)) * x0
        if len(self.x0s) == 2:  # second order: x0 linear in lambda through the previous prediction
            s1, m1 = self.x0s[0]
            r0 = (self.lam[i] - self.lam[s1]) / h
            D1 = (1.0 / r0) * (x0 - m1)
            x_t = x_t - 0.5 * (self.alpha[t] * (torch.exp(-h) - 1.0)) * D1
        return x_t.to(eps.dtype)


class Euler(Sampler):
    """Euler's method on dx/dsigma = (x - x0) / sigma in the variance-exploding variable
    sigma = sigma_t / alpha_t.

    Here x_sigma = x0 + sigma * eps is the DDPM latent divided by alpha_t, hence init_noise_sigma = sigma_max
    and the UNet input scaled by 1/sqrt(sigma^2 + 1) (= alpha_t). Timesteps are "linspace" over 0..999 and
    NOT integers (diffusers feeds the UNet fractional t); sigma at fractional t is interpolated linearly.
    """

    def __init__(self, steps):
        t = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps, dtype=np.float32)[::-1].copy()
        acp = alphas_cumprod()
        sigma_all = (((1 - acp) / acp) ** 0.5).numpy()  # [1000], float32
        sigmas = np.interp(t, np.arange(NUM_TRAIN_TIMESTEPS), sigma_all)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # last step to 0
        self.timesteps = torch.from_numpy(t)  # float32
        self.init_noise_sigma = self.sigmas.max().item()

    def scale_model_input(self, x, i):
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise_at(self, x0, noise, i):
        return x0 + self.sigmas[i] * noise  # forward process in the sigma variable

    def step(self, eps, i, x, generator=None):
        x = x.float()  # float32 update (diffusers upcasts), returned in the model's dtype
        sigma = self.sigmas[i]
        x0 = x - sigma * eps
        d = (x - x0) / sigma  # the ODE's slope dx/dsigma (= eps, written as diffusers computes it)
        return (x + d * (self.sigmas[i + 1] - sigma)).to(eps.dtype)


SAMPLERS = {"ddpm": DDPM, "ddim": DDIM, "unipc": UniPC, "dpmpp2m": DPMSolverPP, "euler": Euler}


def make_sampler(name, steps, **kwargs):
    """A fresh sampler for one run: name in ddpm|ddim|unipc|dpmpp2m|euler (kwargs: DDIM's eta)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in 1..{NUM_TRAIN_TIMESTEPS}, got {steps}")
    return SAMPLERS[name](steps, **kwargs)
