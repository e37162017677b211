"""Training objectives: how t is drawn, what the network regresses, and how each sample counts.

All methods share one shape: draw (t, eps) per sample, mix x_t = alpha x0 + sigma eps, regress
the network output on the parameterization's target with an L1 or L2 norm, times a weight.
They differ only in the time distribution, the parameterization, the norm and the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.denoisers import Coefficients, Denoiser
from difflab.schedules import ForwardProcess

#: maps uniform u in (0, 1) to times t, so that every distribution can be stratified.
TimeTransform = Callable[[Tensor], Tensor]


def discrete_times(values: Tensor) -> TimeTransform:
    """Uniform over a finite set of times (the tutorial's levels, DDPM's steps 1..T)."""

    def transform(u: Tensor) -> Tensor:
        table = values.to(device=u.device, dtype=u.dtype)
        return table[(u * len(values)).long().clamp_max(len(values) - 1)]

    return transform


def uniform_times(t_min: float, t_max: float) -> TimeTransform:
    return lambda u: t_min + u * (t_max - t_min)


def logit_normal_times(mean: float, std: float) -> TimeTransform:
    """t = sigmoid(N(mean, std^2)) (Esser et al. 2024, eq. 19)."""
    return lambda u: torch.sigmoid(mean + std * torch.special.ndtri(u))


def log_normal_sigma_times(process: ForwardProcess, mean: float, std: float) -> TimeTransform:
    """ln(sigma/alpha) ~ N(mean, std^2) (Karras et al. 2022, Table 1, P_mean and P_std)."""
    return lambda u: process.t_from_ratio(torch.exp(mean + std * torch.special.ndtri(u)))


def draw_uniform(
    n: int, generator: torch.Generator, device: torch.device, stratified: bool
) -> Tensor:
    """n uniforms in (0, 1); stratified puts exactly one in each of n equal bins, shuffled."""
    u = torch.rand(n, generator=generator, device=device)
    if stratified:
        bins = torch.randperm(n, generator=generator, device=device)
        u = (bins + u) / n
    return u.clamp(1e-6, 1 - 1e-6)


@dataclass
class Draw:
    """The random part of one training batch: a time and a noise image per sample."""

    t: Tensor
    eps: Tensor

    def __getitem__(self, index: slice) -> Draw:
        return Draw(self.t[index], self.eps[index])


@dataclass
class Objective:
    times: TimeTransform
    norm: str = "l2"  # "l1" (the tutorial) or "l2"
    min_snr_gamma: float = 0.0  # Hang et al. 2023: weight min(SNR, gamma) on the x0 error
    stratified: bool = False

    def draw(
        self, batch_size: int, shape: tuple[int, ...], generator: torch.Generator, device
    ) -> Draw:
        u = draw_uniform(batch_size, generator, device, self.stratified)
        eps = torch.randn((batch_size, *shape), generator=generator, device=device)
        return Draw(self.times(u), eps)

    def loss(
        self, denoiser: Denoiser, x0: Tensor, draw: Draw, labels: Tensor | None = None
    ) -> Tensor:
        """Per-sample loss [N]; the trainer reduces it."""
        c = denoiser.coefficients(draw.t, x0.ndim)
        x_t = c.alpha * x0 + c.sigma * draw.eps
        out = denoiser.raw(x_t, draw.t, labels).float()
        target = denoiser.parameterization.target(x0, draw.eps, c)
        error = (out - target).abs() if self.norm == "l1" else (out - target) ** 2
        per_sample = error.flatten(1).mean(1)
        if self.min_snr_gamma > 0:
            per_sample = per_sample * self._min_snr_weight(denoiser, c)
        return per_sample

    def _min_snr_weight(self, denoiser: Denoiser, c: Coefficients) -> Tensor:
        snr = (c.alpha / c.sigma).flatten() ** 2
        implicit = denoiser.parameterization.snr_weight(snr)
        return snr.clamp_max(self.min_snr_gamma) / implicit

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        generator: torch.Generator,
        labels: Tensor | None = None,
    ) -> Tensor:
        draw = self.draw(x0.shape[0], tuple(x0.shape[1:]), generator, x0.device)
        return self.loss(denoiser, x0, draw, labels)
