"""Forward processes and parameterizations against their closed forms (no training)."""

import math

import pytest
import torch

from difflab.denoisers import (
    Coefficients,
    EDMPreconditioning,
    EpsilonPrediction,
    NextStepPrediction,
    SamplePrediction,
    VelocityPrediction,
    VPrediction,
)
from difflab.schedules import DDPMSchedule, EDMSchedule, LinearPath, TutorialPath, edm_sigma_grid


def test_tutorial_time_bar_matches_notebook():
    path = TutorialPath(num_levels=16)
    expected = 1 - torch.linspace(0, 1, 17, dtype=torch.float64)
    assert torch.equal(path.time_bar, expected)
    assert path.time_bar[0] == 1 and path.time_bar[16] == 0  # level 0 is pure noise
    # the network is told the raw integer level k for t = time_bar[k]
    assert path.noise_condition(path.time_bar).tolist() == list(range(17))


def test_ddpm_linear_alpha_bar_is_the_product_of_one_minus_beta():
    ddpm = DDPMSchedule(num_timesteps=1000, schedule="linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    expected = torch.prod(1 - betas[:500])
    t = torch.tensor([500 / 1000])
    alpha, sigma = ddpm.alpha_sigma(t.double())
    assert alpha.item() ** 2 == pytest.approx(expected.item(), rel=1e-12)
    assert alpha.item() ** 2 + sigma.item() ** 2 == pytest.approx(1.0)  # variance preserving
    # the clean end and the noisy end
    assert ddpm.alpha_sigma(torch.tensor([0.0], dtype=torch.float64))[1].item() == 0
    assert ddpm.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_ddpm_cosine_schedule_matches_nichol_dhariwal():
    ddpm = DDPMSchedule(num_timesteps=1000, schedule="cosine")
    s = 0.008

    def f(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    for i in (1, 100, 500, 900):
        assert ddpm.alpha_bar[i].item() == pytest.approx(f(i / 1000) / f(0), rel=1e-9)
    assert (ddpm.betas() <= 0.999).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_snr_decreases_monotonically(schedule):
    ddpm = DDPMSchedule(schedule=schedule)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    alpha, sigma = ddpm.alpha_sigma(t)
    snr = (alpha / sigma) ** 2
    assert (snr[1:] < snr[:-1]).all()


def test_ddpm_grid_respaces_from_T_to_zero():
    ddpm = DDPMSchedule(num_timesteps=1000)
    grid = ddpm.grid(10)
    assert len(grid) == 11 and grid[0] == 1 and grid[-1] == 0
    assert torch.equal(ddpm.index(grid), torch.arange(1000, -1, -100))


def test_edm_sigma_grid_endpoints_and_rho_spacing():
    grid = edm_sigma_grid(18, 0.002, 80.0, 7.0)
    assert len(grid) == 19 and grid[-1] == 0
    assert grid[0].item() == pytest.approx(80.0) and grid[-2].item() == pytest.approx(0.002)
    steps = grid[:-1] ** (1 / 7)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(17), rtol=1e-9)


def test_edm_noise_condition_is_log_sigma_over_four():
    edm = EDMSchedule()
    sigma = torch.tensor([0.5, 2.0])
    assert torch.allclose(edm.noise_condition(sigma), sigma.log() / 4)


@pytest.mark.parametrize("process", [LinearPath(), EDMSchedule(), DDPMSchedule()])
def test_ratio_inverts_sigma_over_alpha(process):
    ratios = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    alpha, sigma = process.alpha_sigma(process.t_from_ratio(ratios))
    tolerance = 0.05 if isinstance(process, DDPMSchedule) else 1e-9  # DDPM: nearest step
    assert torch.allclose(sigma / alpha, ratios, rtol=tolerance)


def _coefficients(process, t, ndim=4):
    return Coefficients.at(process, t, ndim, derivatives=process.differentiable)


PARAMETERIZATIONS = [
    (DDPMSchedule(), EpsilonPrediction()),
    (DDPMSchedule(), SamplePrediction()),
    (DDPMSchedule(schedule="cosine"), VPrediction()),
    (LinearPath(), VelocityPrediction()),
    (LinearPath(), VPrediction()),
    (EDMSchedule(), EDMPreconditioning(0.5)),
    (TutorialPath(), NextStepPrediction(TutorialPath(), 1 / 16)),
]


@pytest.mark.parametrize(("process", "param"), PARAMETERIZATIONS, ids=lambda v: type(v).__name__)
def test_target_and_conversion_round_trip(process, param):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    if isinstance(process, TutorialPath):
        t = process.time_bar[torch.tensor([0, 1, 5, 8, 14, 15])]
    elif isinstance(process, EDMSchedule):
        t = torch.tensor([0.01, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    else:
        t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64)
    c = _coefficients(process, t)
    x_t = c.alpha * x0 + c.sigma * eps
    pred = param.to_x0_eps(param.target(x0, eps, c), x_t, c)
    assert torch.allclose(pred.x0, x0, atol=1e-9)
    assert torch.allclose(pred.eps, eps, atol=1e-9)


def test_next_step_target_is_the_tutorial_forward_noise_pair():
    """forward_noise(x, t): img_a = x(1-a) + n a and img_b = x(1-b) + n b with the same noise."""
    process = TutorialPath()
    param = NextStepPrediction(process, 1 / 16)
    x0, noise = (
        torch.randn(4, 3, 8, 8, dtype=torch.float64),
        torch.randn(4, 3, 8, 8, dtype=torch.float64),
    )
    k = torch.tensor([0, 3, 9, 15])
    a, b = process.time_bar[k], process.time_bar[k + 1]
    img_a = x0 * (1 - a.view(-1, 1, 1, 1)) + noise * a.view(-1, 1, 1, 1)
    img_b = x0 * (1 - b.view(-1, 1, 1, 1)) + noise * b.view(-1, 1, 1, 1)
    assert torch.allclose(process.mix(x0, noise, a), img_a)
    assert torch.allclose(param.target(x0, noise, _coefficients(process, a)), img_b)
    # t = 0 (level 0) is pure noise: img_a is the noise itself
    assert torch.equal(process.mix(x0, noise, torch.ones(4, dtype=torch.float64)), noise)
