"""Samplers: pure functions of (denoiser, initial noise, time grid, noise source).

A grid is a descending 1-D float64 tensor of times on the host whose last entry is the clean
end; ``len(grid) - 1`` is the number of steps. The step sizes and the schedule's scalars are
host arithmetic on the grid; the denoiser puts a time onto the images' device when it meets
them (``denoisers.times_like``), so nothing here creates a tensor on a device of its own and
nothing reads the device back. A sampler keeps no state between calls and sees only
``denoiser(x, t)``: class labels and guidance are bound into the denoiser by the caller
(``Denoiser.bind``). Stochastic samplers draw fresh noise from a ``SampleNoise`` that holds one
generator per image, so an image does not depend on the batch it was drawn in (Karras et al.
2022, ``StackedRandomGenerator``).

``on_step(i, x, x0)`` is called after every step with the new state and the current x0 estimate,
for progress strips and GIFs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from difflab.denoisers import Denoiser, Prediction
from difflab.devices import to_device

StepCallback = Callable[[int, Tensor, Tensor], None]


class SampleNoise:
    """Gaussian noise with one generator per image, seeded from the image's index.

    The generators live on the host and the noise is then copied to ``device``, so a seed gives
    the same image on the CPU and on a GPU (a few KB per image and step: cheap next to a network
    evaluation).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int]) -> Tensor:
        """A [N, *shape] tensor on ``device``, row i from generator i."""
        noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return to_device(noise, self.device)


def _predict(denoiser: Denoiser, x: Tensor, t: Tensor, clip_x0: bool = False) -> Prediction:
    """(x0, eps) at t; ``clip_x0`` clips x0 to the data range [-1, 1] and recomputes eps from it
    (Ho et al. 2020's sampler; with eps-prediction x0 = (x - sigma eps) / alpha magnifies the
    network's error by 1 / alpha at high noise)."""
    pred = denoiser(x, t)
    x0, eps = pred.x0.float(), pred.eps.float()
    if clip_x0:
        alpha, sigma = _scalars(denoiser, t)
        x0 = x0.clamp(-1, 1)
        eps = (x.float() - alpha * x0) / sigma if sigma > 0 else eps
    return Prediction(x0, eps)


def _scalars(denoiser: Denoiser, t: Tensor) -> tuple[float, float]:
    """alpha(t), sigma(t) of a host time, as Python numbers."""
    alpha, sigma = denoiser.process.alpha_sigma(t.reshape(1))
    return float(alpha), float(sigma)


def _report(on_step: StepCallback | None, i: int, x: Tensor, x0: Tensor) -> None:
    if on_step is not None:
        on_step(i, x, x0)


@torch.inference_mode()
def tutorial_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """The tutorial's loop: ``for i in 0..15: x = model(x, i)``, deterministic, no re-noising.

    With the next-step parameterization the prediction *is* the next image; rebuilding it from
    (x0, eps) at the next level gives the same image up to rounding.
    """
    x = noise
    for i in range(len(grid) - 1):
        out = denoiser.raw(x, grid[i]).float()
        if on_step is not None:  # the x0 estimate is only needed by observers
            on_step(i, out, denoiser.to_x0_eps(out, x, grid[i]).x0)
        x = out
    return x


@torch.inference_mode()
def ddim_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12): x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z.

    s = eta * sqrt((1 - ab') / (1 - ab)) * sqrt(1 - ab / ab') (eq. 16); eta = 0 is deterministic,
    eta = 1 is DDPM's ancestral sampler on the same grid.
    """
    x = noise
    for i in range(len(grid) - 1):
        pred = _predict(denoiser, x, grid[i], clip_x0)
        alpha, sigma = _scalars(denoiser, grid[i])
        alpha_next, sigma_next = _scalars(denoiser, grid[i + 1])
        s = 0.0
        if eta > 0 and sigma > 0:
            s = eta * (sigma_next / sigma) * (1 - (alpha / alpha_next) ** 2) ** 0.5
        x = alpha_next * pred.x0 + max(sigma_next**2 - s**2, 0.0) ** 0.5 * pred.eps
        if s > 0:
            x = x + s * rng.randn(x.shape[1:]).to(x)
        _report(on_step, i, x, pred.x0)
    return x


@torch.inference_mode()
def ancestral_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
    clip_x0: bool = False,
    variance: str = "small",
) -> Tensor:
    """DDPM ancestral sampling with the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7).

    On a respaced grid, beta is the effective 1 - ab_t / ab_s between neighbouring grid points
    (Nichol & Dhariwal 2021, sec. 4). The variance of each step is the posterior's beta_tilde
    ("small") or beta ("large"): Ho et al. sec. 3.2 found both equally good, and their CIFAR-10
    sampler (FID 3.17) uses beta, with no noise on the last step to the clean end.
    """
    x = noise
    for i in range(len(grid) - 1):
        pred = _predict(denoiser, x, grid[i], clip_x0)
        alpha_bar = _scalars(denoiser, grid[i])[0] ** 2
        alpha_bar_prev = _scalars(denoiser, grid[i + 1])[0] ** 2
        beta = 1 - alpha_bar / alpha_bar_prev
        # Posterior mean: eq. 7, coefficients of x0 and x_t.
        coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
        coef_xt = (1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        x = coef_x0 * pred.x0 + coef_xt * x
        step_variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)  # beta_tilde, eq. 7
        if variance == "large" and alpha_bar_prev < 1:
            step_variance = beta
        if step_variance > 0:
            x = x + step_variance**0.5 * rng.randn(x.shape[1:]).to(x)
        _report(on_step, i, x, pred.x0)
    return x


def _velocity(denoiser: Denoiser, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps, and the x0 estimate."""
    pred = _predict(denoiser, x, t)
    dalpha, dsigma = (float(v) for v in denoiser.process.derivatives(t.reshape(1)))
    return dalpha * pred.x0 + dsigma * pred.eps, pred.x0


@torch.inference_mode()
def euler_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (one evaluation per step)."""
    x = noise
    for i in range(len(grid) - 1):
        velocity, x0 = _velocity(denoiser, x, grid[i])
        x = x + float(grid[i + 1] - grid[i]) * velocity
        _report(on_step, i, x, x0)
    return x


@torch.inference_mode()
def heun_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); the last step to sigma = 0 is Euler."""
    x = noise
    for i in range(len(grid) - 1):
        x = _heun_step(denoiser, x, grid[i], grid[i + 1], on_step, i)
    return x


def _heun_step(
    denoiser: Denoiser,
    x: Tensor,
    t: Tensor,
    t_next: Tensor,
    on_step: StepCallback | None,
    i: int,
) -> Tensor:
    h = float(t_next - t)
    velocity, x0 = _velocity(denoiser, x, t)
    x_next = x + h * velocity
    if _scalars(denoiser, t_next)[1] > 0:  # Karras et al. 2022, Algorithm 1, line 9
        velocity_next, x0 = _velocity(denoiser, x_next, t_next)
        x_next = x + h * 0.5 * (velocity + velocity_next)
    _report(on_step, i, x_next, x0)
    return x_next


@torch.inference_mode()
def edm_stochastic_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
    s_churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): add noise, then a Heun step.

    Defaults are EDM's released ImageNet-64 settings (meant for 256 steps); gamma is
    min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0, so at few steps every level
    inside the range gets the maximal churn.
    """
    num_steps = len(grid) - 1
    x = noise
    for i in range(num_steps):
        t = float(grid[i])
        gamma = min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t * (1 + gamma)
        if gamma > 0:  # Algorithm 2, lines 5-6 (alpha = 1: sigma = t)
            x = x + (t_hat**2 - t**2) ** 0.5 * s_noise * rng.randn(x.shape[1:]).to(x)
        t_hat_tensor = torch.tensor(t_hat, dtype=grid.dtype)
        x = _heun_step(denoiser, x, t_hat_tensor, grid[i + 1], on_step, i)
    return x


@torch.inference_mode()
def dpmpp_2m_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in lambda = log(alpha / sigma).

    x' = (sigma'/sigma) x - alpha' (exp(-h) - 1) D with h = lambda' - lambda and D the x0 estimate,
    extrapolated from the previous step when one exists. The last step to sigma = 0 is first order.
    """
    x, x0_prev, h_prev = noise, None, None
    for i in range(len(grid) - 1):
        pred = _predict(denoiser, x, grid[i])
        alpha, sigma = _scalars(denoiser, grid[i])
        alpha_next, sigma_next = _scalars(denoiser, grid[i + 1])
        if sigma_next == 0:
            x = alpha_next * pred.x0
        else:
            lam, lam_next = _log_snr(alpha, sigma), _log_snr(alpha_next, sigma_next)
            h = lam_next - lam
            d = pred.x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * pred.x0 - 1 / (2 * r) * x0_prev
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
            h_prev = h
        x0_prev = pred.x0
        _report(on_step, i, x, pred.x0)
    return x


def _log_snr(alpha: float, sigma: float) -> float:
    """log(alpha / sigma); -inf at pure noise (alpha = 0, the flow path's t = 1)."""
    return math.log(alpha / sigma) if alpha > 0 else -math.inf


# Adams-Bashforth coefficients by order: x' = x + h * sum_k c_k f_{i-k} (newest slope first).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@torch.inference_mode()
def ipndm_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
    max_order: int = 4,
) -> Tensor:
    """iPNDM (Zhang & Chen 2022, sec. 4 and App. B; the form used by Zhou et al. 2024's
    diff-sampler): explicit Adams-Bashforth steps with the fixed coefficients of order up to 4,
    the first steps warmed up at lower orders, one evaluation per step.

    It integrates the probability-flow ODE in EDM's variables, y = x / alpha and s = sigma /
    alpha, where dy/ds = (y - x0) / s is simply the eps estimate (Karras et al. 2022, eq. 4 with
    sigma(t) = t), so it runs on any process whose grid starts below pure noise (alpha > 0).
    """
    x, slopes = noise, []
    for i in range(len(grid) - 1):
        pred = _predict(denoiser, x, grid[i])
        alpha, sigma = _scalars(denoiser, grid[i])
        alpha_next, sigma_next = _scalars(denoiser, grid[i + 1])
        slopes = [pred.eps, *slopes][:max_order]
        step = sum(c * d for c, d in zip(_ADAMS_BASHFORTH[len(slopes)], slopes, strict=True))
        y_next = x / alpha + (sigma_next / alpha_next - sigma / alpha) * step
        x = alpha_next * y_next
        _report(on_step, i, x, pred.x0)
    return x


@torch.inference_mode()
def consistency_sampler(
    denoiser: Denoiser,
    noise: Tensor,
    grid: Tensor,
    rng: SampleNoise | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0 = f(x, t_0); then at
    each next level tau (as sigma / alpha), x = alpha (x0 + sqrt(tau^2 - sigma_min^2) z) and
    x0 = f(x, tau). One step is one network evaluation; the last grid point (0) returns x0."""
    sigma_min = denoiser.parameterization.sigma_min
    x = noise
    for i in range(len(grid) - 1):
        x0 = _predict(denoiser, x, grid[i]).x0
        alpha, sigma = _scalars(denoiser, grid[i + 1])
        x = x0
        if sigma > 0:  # re-noise to the next level
            spread = max((sigma / alpha) ** 2 - sigma_min**2, 0.0) ** 0.5
            x = alpha * (x0 + spread * rng.randn(x.shape[1:]).to(x))
        _report(on_step, i, x, x0)
    return x
