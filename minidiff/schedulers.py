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


def v_target(x0, noise, t):
    """v-prediction target (Salimans & Ho 2022): v = alpha_t * eps - sigma_t * x0 (SD-1.x trains on eps)."""
    acp = _at(alphas_cumprod(), t, x0)
    return acp ** 0.5 * noise - (1 - acp) ** 0.5 * x0


def predict_x0(x, eps, t):
    """The clean latent implied by an eps prediction: x0 = (x_t - sigma_t * eps) / alpha_t."""
    acp = _at(alphas_cumprod(), t, x)
    return (x - (1 - acp) ** 0.5 * eps) / acp ** 0.5


def _randn(like, generator):
    """N(0, I) noise shaped like `like`, drawn on the generator's device (diffusers' randn_tensor)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


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
        x0 = (x - (1 - acp_t) ** 0.5 * eps) / acp_t ** 0.5
        # Posterior mean (Ho et al. eq. 7): a blend of the predicted x0 and the current sample.
        mean = ((acp_prev ** 0.5 * beta / (1 - acp_t)) * x0
                + (alpha ** 0.5 * (1 - acp_prev) / (1 - acp_t)) * x)
        if t == 0:
            return mean
        # "fixed_small" variance beta_tilde = (1 - acp_prev) / (1 - acp_t) * beta, clamped as diffusers does.
        var = torch.clamp((1 - acp_prev) / (1 - acp_t) * beta, min=1e-20)
        return mean + var ** 0.5 * _randn(eps, generator)  # one fresh draw per step


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
        x0 = (x - (1 - acp_t) ** 0.5 * eps) / acp_t ** 0.5
        # eta interpolates between DDIM (0) and DDPM's posterior noise (1), Song et al. eq. 16.
        std = self.eta * ((1 - acp_prev) / (1 - acp_t) * (1 - acp_t / acp_prev)) ** 0.5
        x_prev = acp_prev ** 0.5 * x0 + (1 - acp_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * _randn(eps, generator)
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
        s = min(t - self.ratio, NUM_TRAIN_TIMESTEPS - 1)  # the level x is at now
        acp_s = self.alphas_cumprod[s] if s >= 0 else self.alphas_cumprod[0]
        acp_t = self.alphas_cumprod[t]
        x0 = (x - (1 - acp_s) ** 0.5 * eps) / acp_s ** 0.5
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
        return (x - self.sigma[i] * eps) / self.alpha[i]


class UniPC(_ExponentialIntegrator):
    """UniPC (bh2, order 2, data prediction, lower order at the start and at the final step), diffusers 0.17.

    Per step i: x0_i from the model at the (uncorrected) sample; UniC corrects the sample of step i using
    x0_i; UniP predicts step i+1 from the corrected sample. The last step targets t=0's level acp[0]
    (sigma_t ~ 0.0292), not zero noise.
    """

    def __init__(self, steps):
        super().__init__(steps, alphas_cumprod()[0])
        self.last_x, self.last_order = None, None  # corrected sample the previous predictor started from

    def _update(self, x, s0, t, order, x0_t=None):
        """UniP (x0_t None) or UniC step from level index s0 (sample x) to t, B(h) = e^h - 1 ("bh2").

        The newest stored prediction m0 = x0 at s0; order 2 adds m1 = x0 at the level before s0.
        """
        h = self.lam[t] - self.lam[s0]
        hh = -h                     # data prediction integrates e^-h terms
        h_phi_1 = torch.expm1(hh)   # e^-h - 1: weight of m0 in the first-order (DDIM) part
        B_h = torch.expm1(hh)       # bh2 choice of the scaling B(h)
        m0 = self.x0s[-1][1]
        x_t = self.sigma[t] / self.sigma[s0] * x - self.alpha[t] * h_phi_1 * m0
        if order == 2:
            s1, m1 = self.x0s[-2]
            r1 = (self.lam[s1] - self.lam[s0]) / h   # step ratio, negative: s1 lies behind s0
            D1 = (m1 - m0) / r1                        # finite-difference slope of x0 in lambda, times h
        if x0_t is None:  # predictor: order 2 uses rho = 1/2 (the value the bh2 linear system gives)
            return x_t - self.alpha[t] * B_h * 0.5 * D1 if order == 2 else x_t
        if order == 1:  # corrector with one slope, that of the new prediction x0_t: rho = 1/2
            return x_t - self.alpha[t] * B_h * (0.5 * (x0_t - m0))
        # Order-2 corrector: rhos solve [[1, 1], [r1, 1]] rho = b, b_k = k! * phi_{k+1}(hh) / B_h (UniPC
        # eq. 8), phi from the recurrence phi_{k+1} = (phi_k - 1/k!) / hh. Float32 op order as diffusers.
        phi_2 = h_phi_1 / hh - 1
        b1 = phi_2 / B_h
        b2 = 2 * (phi_2 / hh - 0.5) / B_h
        rho0 = (b1 - b2) / (1 - r1)  # 2x2 system solved in closed form
        rho1 = b1 - rho0
        return x_t - self.alpha[t] * B_h * (rho0 * D1 + rho1 * (x0_t - m0))

    def step(self, eps, i, x, generator=None):
        x0 = self.data_prediction(eps, i, x)  # from the sample BEFORE correction (diffusers order)
        if self.last_x is not None:  # UniC: redo step i-1 with the new x0 at its end point
            x = self._update(self.last_x, self.x0s[-1][0], i, self.last_order, x0_t=x0)
        self.x0s = self.x0s[-1:] + [(i, x0)]
        # Warm-up: order 1 until two predictions exist; lower_order_final: order 1 for the last step.
        order = min(2, len(self.timesteps) - i, len(self.x0s))
        self.last_x, self.last_order = x, order
        return self._update(x, i, i + 1, order)


class DPMSolverPP(_ExponentialIntegrator):
    """DPM-Solver++(2M), "midpoint" form, ending at zero noise (diffusers' defaults).

    It equals UniPC's predictor alone (UniP-2 with B(h) = e^h - 1 is this update); no corrector. The first
    step is order 1 (no history yet), and so is the last: its target sigma = 0 has lambda = inf, e^-h = 0,
    so x = x0.
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
