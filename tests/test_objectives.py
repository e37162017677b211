"""Objectives: time distributions, stratification and loss weights against their formulas."""

from __future__ import annotations

import pytest
import torch

from difflab.config import MethodConfig
from difflab.denoisers import (
    Coefficients,
    Denoiser,
    EpsilonPrediction,
    SamplePrediction,
    VPrediction,
)
from difflab.objectives import Objective, draw_uniform, log_normal_sigma_times, logit_normal_times
from difflab.registry import METHODS
from difflab.schedules import DDPMSchedule, EDMSchedule, LinearPath


def test_stratified_uniforms_put_one_sample_in_each_bin():
    u = draw_uniform(64, torch.Generator().manual_seed(0), torch.device("cpu"), stratified=True)
    bins = (u * 64).floor().long().sort().values
    assert torch.equal(bins, torch.arange(64))


def test_log_normal_sigma_has_edm_moments():
    u = draw_uniform(20000, torch.Generator().manual_seed(1), torch.device("cpu"), stratified=True)
    sigma = log_normal_sigma_times(EDMSchedule(), -1.2, 1.2)(u.double())
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)
    # on the flow path the same levels arrive through t = sigma / (1 + sigma)
    t = log_normal_sigma_times(LinearPath(), -1.2, 1.2)(u.double())
    assert torch.allclose(t / (1 - t), sigma)


def test_logit_normal_times_are_in_the_unit_interval_with_median_half():
    u = torch.rand(10000, generator=torch.Generator().manual_seed(2))
    t = logit_normal_times(0.0, 1.0)(u.clamp(1e-6, 1 - 1e-6))
    assert ((t > 0) & (t < 1)).all() and t.median().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    ("param", "expected"),
    [(EpsilonPrediction(), lambda snr: snr.clamp_max(5) / snr),
     (SamplePrediction(), lambda snr: snr.clamp_max(5)),
     (VPrediction(), lambda snr: snr.clamp_max(5) / (snr + 1))],
)  # fmt: skip
def test_min_snr_weight_matches_hang_et_al(param, expected):
    """Hang et al. 2023: weight min(SNR, gamma) on the x0 error, divided by the target's own."""
    process = DDPMSchedule()
    t = torch.tensor([0.01, 0.2, 0.5, 0.9])
    c = Coefficients.at(process, t, 4)
    snr = (c.alpha / c.sigma).flatten() ** 2
    denoiser = Denoiser(torch.nn.Identity(), process, param)
    weight = Objective(lambda u: u, min_snr_gamma=5.0)._min_snr_weight(denoiser, c)
    assert torch.allclose(weight, expected(snr))


def test_edm_loss_weight_is_built_into_the_target():
    """MSE on F's target equals lambda(sigma) * ||D - x0||^2 with lambda = 1 / c_out^2 (eq. 8)."""
    method = METHODS["edm"](MethodConfig(name="edm"))
    x0, eps = (
        torch.randn(3, 3, 4, 4, dtype=torch.float64),
        torch.randn(3, 3, 4, 4, dtype=torch.float64),
    )
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c = Coefficients.at(method.process, sigma, 4)
    out = torch.randn_like(x0)  # any network output
    param = method.parameterization
    f_loss = ((out - param.target(x0, eps, c)) ** 2).flatten(1).mean(1)
    d = param.to_x0_eps(out, x0 + c.sigma * eps, c).x0
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(f_loss, lam * ((d - x0) ** 2).flatten(1).mean(1))


def test_tutorial_objective_is_l1_between_model_of_img_a_and_img_b():
    method = METHODS["tutorial"](MethodConfig(name="tutorial"))
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, cond, labels=None):
            seen["x"], seen["cond"] = x, cond
            return torch.zeros_like(x)

    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    draw = method.objective.draw(
        8, (3, 4, 4), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    loss = method.objective.loss(method.denoiser(Recorder()), x0, draw)
    k = seen["cond"]
    assert ((k >= 0) & (k <= 15) & (k == k.round())).all()  # raw integer levels 0..15
    a, b = (1 - k / 16).view(-1, 1, 1, 1), (1 - (k + 1) / 16).view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], x0 * (1 - a) + draw.eps * a, atol=1e-6)  # img_a
    img_b = x0 * (1 - b) + draw.eps * b
    assert torch.allclose(loss, img_b.abs().flatten(1).mean(1), atol=1e-6)  # L1 to img_b
