"""Samplers driven by the exact denoiser of a known Gaussian reproduce that Gaussian.

For data x0 ~ N(mu, s^2) per pixel and x_t = alpha x0 + sigma eps, the optimal denoiser is
E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu). ``ExactDenoiser`` turns
that into each parameterization's raw output through ``target``, so the conversions back to
(x0, eps) are exercised too.

Tolerances. 250 images of 256 independent pixels give 64,000 values: the standard error is 0.002
on the mean and 0.56% on the variance. Each sampler also has a discretisation error. At the step
counts of ``CONVERGED`` it is below 1.5% (measured here: ancestral-1000 -1.2%, Heun-50 flow
-0.1%, EDM Heun-64 +0.7%, DPM-Solver++ 50 +0.2..1.3%), so we ask for 0.01 on the mean and 3%
on the variance. At the papers' few-step settings (DDIM 50, EDM Heun 18) the error on this toy
is real and large (-11% and +11% in variance), so ``FEW_STEP`` compares against the variance that
the same update rule must give, computed independently by a scalar recursion, within 3%.
"""

import itertools
import math

import pytest
import torch

from difflab import samplers as S
from difflab.config import MethodConfig, SamplerConfig
from difflab.denoisers import Denoiser, times_like
from difflab.errors import DifflabError
from difflab.plans import build_sampler
from difflab.registry import METHODS
from difflab.samplers import SampleNoise
from difflab.seeds import image_seeds

MU, STD = 0.3, 0.5
SHAPE = (4, 8, 8)
NUM = 250


class ExactDenoiser(Denoiser):
    def __init__(self, method):
        super().__init__(torch.nn.Identity(), method.process, method.parameterization)

    def raw(self, x, t, labels=None):
        c = self.coefficients(times_like(t, x), x.ndim)
        alpha, sigma = c.alpha.double(), c.sigma.double()
        x = x.double()
        gain = alpha * STD**2 / (alpha**2 * STD**2 + sigma**2)
        x0 = MU + gain * (x - alpha * MU)
        eps = (x - alpha * x0) / sigma
        return self.parameterization.target(x0, eps, c).float()


def _plan(method_name, sampler, steps, **options):
    method = METHODS[method_name](MethodConfig(name=method_name))
    return method, build_sampler(method, SamplerConfig(name=sampler, steps=steps, **options))


def _run(method_name, sampler, steps, num=NUM, **options):
    method, plan = _plan(method_name, sampler, steps, **options)
    rng = SampleNoise(image_seeds(0, 0, num))
    scale = float(method.process.alpha_sigma(plan.grid[:1])[1])
    noise = rng.randn(SHAPE) * scale
    return plan(ExactDenoiser(method), noise, rng)


CONVERGED = [
    ("ddpm", "ancestral", 1000, {}),
    ("ddpm-cosine", "ancestral", 1000, {}),
    ("ddpm", "ddim", 1000, {"eta": 1.0}),
    ("ddpm", "dpm++2m", 50, {}),
    ("flow", "euler", 1000, {}),
    ("flow", "heun", 50, {}),
    ("flow", "heun", 64, {"grid": "edm"}),
    ("edm", "edm", 64, {}),
    ("edm", "edm-stochastic", 256, {}),
    ("edm", "dpm++2m", 50, {}),
]


@pytest.mark.parametrize(("method", "sampler", "steps", "options"), CONVERGED)
def test_sampler_reproduces_the_gaussian(method, sampler, steps, options):
    x = _run(method, sampler, steps, **options)
    assert x.shape == (NUM, *SHAPE) and torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.var().item() == pytest.approx(STD**2, rel=0.03)


def _predicted_variance(method_name, sampler, steps, **options):
    """Output variance of a deterministic sampler on N(0, s^2), by a scalar recursion.

    Every quantity is linear in x: x0_hat = g x with g = alpha s^2 / (alpha^2 s^2 + sigma^2) and
    eps_hat = (1 - alpha g) x / sigma, so each step multiplies the standard deviation by a factor.
    """
    method, plan = _plan(method_name, sampler, steps, **options)
    process, grid = method.process, plan.grid.tolist()

    def coefficients(t):
        alpha, sigma = (
            float(v) for v in process.alpha_sigma(torch.tensor([t], dtype=torch.float64))
        )
        return alpha, sigma, alpha * STD**2 / (alpha**2 * STD**2 + sigma**2)

    def velocity(t):  # dx/dt per unit x
        alpha, sigma, g = coefficients(t)
        dalpha, dsigma = (
            float(v) for v in process.derivatives(torch.tensor([t], dtype=torch.float64))
        )
        return dalpha * g + dsigma * (1 - alpha * g) / sigma

    std = coefficients(grid[0])[1]
    for t, t_next in itertools.pairwise(grid):
        if sampler == "ddim":
            alpha, sigma, g = coefficients(t)
            alpha_next, sigma_next, _ = coefficients(t_next)
            std *= alpha_next * g + sigma_next * (1 - alpha * g) / sigma
        else:  # Heun, Euler on the last step to sigma = 0
            h, v = t_next - t, velocity(t)
            if coefficients(t_next)[1] > 0:
                std *= 1 + h / 2 * (v + velocity(t_next) * (1 + h * v))
            else:
                std *= 1 + h * v
    return std**2


FEW_STEP = [
    ("ddpm", "ddim", 50),
    ("edm", "edm", 18),
    ("flow", "heun", 18),
    ("ddpm-cosine", "ddim", 10),
]


@pytest.mark.parametrize(("method", "sampler", "steps"), FEW_STEP)
def test_few_step_samplers_match_their_update_rule(method, sampler, steps):
    x = _run(method, sampler, steps)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.var().item() == pytest.approx(_predicted_variance(method, sampler, steps), rel=0.03)


def test_too_few_euler_steps_are_measurably_wrong():
    """The tolerance can fail: 2 Euler steps of the flow ODE visibly shrink the variance."""
    x = _run("flow", "euler", 2)
    assert abs(x.var().item() - STD**2) > 0.1 * STD**2


def test_ancestral_equals_ddim_with_eta_one():
    method = METHODS["ddpm"](MethodConfig(name="ddpm"))
    denoiser = ExactDenoiser(method)
    grid = method.process.grid(20)
    outs = []
    for run in (
        lambda rng, x: S.ancestral_sampler(denoiser, x, grid, rng),
        lambda rng, x: S.ddim_sampler(denoiser, x, grid, rng, eta=1.0),
    ):
        rng = SampleNoise(range(8))
        outs.append(run(rng, rng.randn(SHAPE)))
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_tutorial_loop_is_an_euler_step_of_the_straight_path():
    """x = model(x, i) sixteen times equals Euler on the flow ODE over the same 16 levels."""
    tutorial = METHODS["tutorial"](MethodConfig(name="tutorial"))
    flow = METHODS["flow"](MethodConfig(name="flow"))
    grid = tutorial.process.grid(16)
    noise = SampleNoise(range(16)).randn(SHAPE)
    frames = []
    a = S.tutorial_sampler(
        ExactDenoiser(tutorial), noise, grid, on_step=lambda i, x, x0: frames.append(i)
    )
    b = S.euler_sampler(ExactDenoiser(flow), noise, grid)
    assert frames == list(range(16))
    assert torch.allclose(a, b, atol=1e-5)


def test_images_do_not_depend_on_the_batch():
    method = METHODS["edm"](MethodConfig(name="edm"))
    plan = build_sampler(method, SamplerConfig(name="edm-stochastic", steps=6))
    seeds = image_seeds(7, 0, 6)

    def run(chunk):
        rng = SampleNoise(chunk)
        return plan(ExactDenoiser(method), rng.randn(SHAPE) * 80, rng)

    whole = run(seeds)
    parts = torch.cat([run(seeds[:2]), run(seeds[2:])])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize(
    ("method", "sampler", "steps"),
    [
        ("ddpm", "ancestral", 1),
        ("ddpm", "ddim", 1),
        ("flow", "heun", 1),
        ("edm", "edm", 1),
        ("edm", "edm-stochastic", 1),
        ("flow", "dpm++2m", 1),
        ("edm", "euler", 1),
    ],
)
def test_one_step_is_finite(method, sampler, steps):
    x = _run(method, sampler, steps, num=8)
    assert torch.isfinite(x).all()


def test_edm_grid_on_ddpm_has_no_repeated_steps():
    """Neighbouring rho-levels map to the same DDPM step; the grid keeps one of each."""
    _, plan = _plan("ddpm", "dpm++2m", 18, grid="edm")
    assert (plan.grid[1:] < plan.grid[:-1]).all()
    assert torch.isfinite(_run("ddpm", "dpm++2m", 18, num=8, grid="edm")).all()


def test_clip_x0_keeps_the_estimate_in_the_data_range():
    seen = []
    x = _run("ddpm", "ddim", 10, num=8, clip_x0=True)
    assert torch.isfinite(x).all()
    method, plan = _plan("ddpm", "ancestral", 10, clip_x0=True)
    rng = SampleNoise(range(8))
    plan(ExactDenoiser(method), rng.randn(SHAPE) * 3, rng, on_step=lambda i, x, x0: seen.append(x0))
    assert all(x0.abs().max() <= 1 for x0 in seen)


def _ancestral_variance(steps: int, variance: str) -> float:
    """Output variance of ancestral sampling on N(mu, s^2) with the exact denoiser, by the scalar
    recursion var' = (c_x0 g + c_xt)^2 var + step variance (Ho et al. 2020, eq. 6-7)."""
    method, plan = _plan("ddpm", "ancestral", steps, variance=variance)
    alpha_bar = [float(a) ** 2 for a in method.process.alpha_sigma(plan.grid)[0]]
    var = 1 - alpha_bar[0]
    for ab, ab_prev in itertools.pairwise(alpha_bar):
        beta = 1 - ab / ab_prev
        g = ab**0.5 * STD**2 / (ab * STD**2 + 1 - ab)
        c_x0 = ab_prev**0.5 * beta / (1 - ab)
        c_xt = (1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)
        small = beta * (1 - ab_prev) / (1 - ab)
        var = (c_x0 * g + c_xt) ** 2 * var + (
            beta if variance == "large" and ab_prev < 1 else small
        )
    return var


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ancestral_variance_choice_follows_its_update_rule(variance):
    x = _run("ddpm", "ancestral", 20, variance=variance)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.var().item() == pytest.approx(_ancestral_variance(20, variance), rel=0.03)


def test_large_variance_adds_more_noise_but_none_on_the_last_step():
    assert _ancestral_variance(20, "large") > 1.05 * _ancestral_variance(20, "small")
    method, plan = _plan("ddpm", "ancestral", 20, variance="large")
    rng = SampleNoise(range(4))
    frames = []
    plan(ExactDenoiser(method), rng.randn(SHAPE), rng, on_step=lambda i, x, x0: frames.append(x))
    # The last step lands on the x0 estimate exactly (posterior mean, no noise) as in Ho et al.
    last_x0 = ExactDenoiser(method)(frames[-2], plan.grid[-2]).x0
    assert torch.allclose(frames[-1], last_x0, atol=1e-5)


def _error_on_a_uniform_sigma_grid(function, steps: int) -> float:
    """Largest error against the exact probability-flow map of N(MU, STD^2) from sigma 2 to 0.2
    (y(s) = MU + (y - MU) sqrt(s^2 + STD^2) / sqrt(S^2 + STD^2)), on a grid uniform in sigma."""
    method = METHODS["edm"](MethodConfig(name="edm"))
    grid = torch.linspace(2.0, 0.2, steps + 1, dtype=torch.float64)
    x = torch.linspace(-4.0, 4.0, 9).reshape(9, 1, 1, 1)
    exact = MU + (x.double() - MU) * (0.2**2 + STD**2) ** 0.5 / (2.0**2 + STD**2) ** 0.5
    return (function(ExactDenoiser(method), x, grid).double() - exact).abs().max().item()


@pytest.mark.parametrize(
    ("function", "order"),
    [(S.euler_sampler, 1), (S.heun_sampler, 2), (S.ipndm_sampler, 4)],
    ids=["euler", "heun", "ipndm"],
)
def test_error_falls_with_steps_at_the_methods_order(function, order):
    """Halving the step divides the error by about 2^order (iPNDM: fourth-order Adams-Bashforth
    once warmed up; its lower-order first steps cost little on this smooth ODE)."""
    errors = [_error_on_a_uniform_sigma_grid(function, n) for n in (10, 20, 40)]
    observed = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    assert all(order - 0.4 < o < order + 0.6 for o in observed), observed


def test_ipndm_beats_euler_and_dpm_solver_at_five_evaluations():
    """On EDM's grid at 5 network evaluations, as diff-sampler's table ranks them."""
    errors = {}
    for sampler in ("ipndm", "dpm++2m", "euler"):
        method, plan = _plan("edm", sampler, 5, grid="edm")
        x = torch.linspace(-2.0, 2.0, 9).reshape(9, 1, 1, 1) * float(plan.grid[0])
        exact = MU + (x.double() - MU) * STD / (float(plan.grid[0]) ** 2 + STD**2) ** 0.5
        errors[sampler] = (plan(ExactDenoiser(method), x).double() - exact).abs().max().item()
    assert errors["ipndm"] < 0.8 * errors["dpm++2m"] < 0.8 * errors["euler"], errors


def test_grids_are_chosen_by_name_for_any_sampler():
    """sampler.grid picks the grid; "default" is the sampler's own (EDM's for edm, few-step for
    ipndm)."""
    method = METHODS["flow"](MethodConfig(name="flow"))
    grids = {
        name: build_sampler(method, SamplerConfig(name="euler", steps=8, grid=name)).grid
        for name in ("process", "edm", "logsnr")
    }
    assert torch.allclose(grids["process"], torch.linspace(1, 0, 9, dtype=torch.float64))
    alpha, sigma = method.process.alpha_sigma(grids["logsnr"][:-1])
    log_snr = (alpha / sigma).log()
    assert torch.allclose(log_snr.diff(), log_snr.diff()[:1].expand(7), atol=1e-9)  # even
    # iPNDM's own grid spends no evaluation between sigma_min and 0: k steps, k useful levels
    few = build_sampler(method, SamplerConfig(name="ipndm", steps=2)).grid
    _, sigma = method.process.alpha_sigma(few)
    ratio = sigma / method.process.alpha_sigma(few)[0]
    assert len(few) == 3 and abs(float(ratio[0]) - 80) < 1e-6 and 2.4 < float(ratio[1]) < 2.6
    edm = build_sampler(method, SamplerConfig(name="ipndm", steps=2, grid="edm")).grid
    assert float(edm[1]) < 0.01  # EDM's grid: its second level is already sigma_min
    with pytest.raises(DifflabError, match="starts below pure noise"):
        build_sampler(method, SamplerConfig(name="ipndm", steps=8, grid="process"))
