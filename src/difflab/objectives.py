"""Training objectives: how t is drawn, what the network regresses, and how each sample counts.

All methods share one shape: draw (t, eps) per sample, mix x_t = alpha x0 + sigma eps, regress
the network output on the parameterization's target with an L1 or L2 norm, times a weight.
They differ only in the time distribution, the parameterization, the norm and the weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from difflab.denoisers import Coefficients, Denoiser
from difflab.schedules import (
    EDMSchedule,
    ForwardProcess,
    _per_sample,
    consistency_levels,
    consistency_sigmas,
)

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
        self,
        batch_size: int,
        shape: tuple[int, ...],
        generator: torch.Generator,
        device,
        images_seen: int = 0,
    ) -> Draw:
        """Times and noise of one batch; ``images_seen`` (how far the run is) only matters to
        objectives with a curriculum."""
        u = draw_uniform(batch_size, generator, device, self.stratified)
        eps = torch.randn((batch_size, *shape), generator=generator, device=device)
        return Draw(self.times(u), eps)

    def loss(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        draw: Draw,
        labels: Tensor | None = None,
        target: Denoiser | None = None,
    ) -> Tensor:
        """Per-sample loss [N]; the trainer reduces it. ``target`` is a second network the
        trainer offers (its EMA weights); objectives that compare two networks use it."""
        c = denoiser.coefficients(draw.t, x0.ndim)
        x_t = c.alpha * x0 + c.sigma * draw.eps
        out = denoiser.raw(x_t, draw.t, labels).float()
        target = denoiser.parameterization.target(x0, draw.eps, c)
        error = (out - target).abs() if self.norm == "l1" else (out - target) ** 2
        per_sample = error.flatten(1).mean(1)
        if self.min_snr_gamma > 0:
            per_sample = per_sample * self._min_snr_weight(denoiser, c)
        return per_sample

    def prepare(self, device: torch.device) -> None:
        """Load what the loss needs besides the network being trained (nothing here)."""

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


def _x0_at(denoiser: Denoiser, y: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
    """The denoiser's x0 at a point given in EDM's variables (y = x / alpha, s = sigma / alpha),
    whatever its process: the consistency objective's levels are ratios s, so one discretisation
    serves every process (on EDM's, t = s and alpha = 1)."""
    t = denoiser.process.t_from_ratio(s)
    alpha = _per_sample(denoiser.process.alpha_sigma(t)[0], y.ndim).to(y.dtype)  # DDPM: f64
    return denoiser(alpha * y, t, labels).x0.float()


def _same_dropout(device: torch.device) -> contextlib.AbstractContextManager:
    """The random state of ``device`` (and the CPU's) restored on leaving: the passes after it
    draw the dropout masks of the pass inside, as Song et al.'s consistency code and ECT do for
    the online and target passes of one network (``torch.random.fork_rng``)."""
    if device.type == "cpu":
        return torch.random.fork_rng([])
    return torch.random.fork_rng([device], device_type=device.type)  # "cuda": the current one


@dataclass
class ConsistencyDraw(Draw):
    """A pair of neighbouring levels of the discretisation per sample: t > t_low as times of
    the model's process (what ``Draw.t`` always is), s > s_low the same levels as EDM's
    sigma / alpha, in which the objective works."""

    t_low: Tensor
    s: Tensor
    s_low: Tensor

    def __getitem__(self, index: slice) -> ConsistencyDraw:
        return ConsistencyDraw(
            self.t[index], self.eps[index], self.t_low[index], self.s[index], self.s_low[index]
        )


@dataclass
class ConsistencyObjective(Objective):
    """Consistency training or distillation (Song et al. 2023, Algorithms 2 and 3, with the
    improvements of Song & Dhariwal 2023): for neighbouring levels sigma_n < sigma_{n+1} of
    the current discretisation, f(x_{n+1}, sigma_{n+1}) is pulled towards f(x_n, sigma_n) of the
    same network, not differentiated (their target network with mu = 0; ``target = "ema"`` uses
    the run's EMA weights instead, the original paper's theta^-). x_n is a teacher's ODE
    step back from x_{n+1} (distillation) or x0 + sigma_n z with the same z (training).

    Loss per sample: lambda(sigma) * (sqrt(|a - b|^2 + c^2) - c), the pseudo-Huber distance with
    c = 0.00054 sqrt(dimensions) and lambda = 1 / (sigma_{n+1} - sigma_n) (improved CT, sec. 3.3
    and 3.1); levels drawn log-normally over the discretisation (their sec. 3.5). ``weighting =
    "uniform"`` is the original paper's instead: n uniform over the N - 1 pairs, lambda = 1
    (Song et al. 2023, Algorithms 2 and 3).
    """

    times: TimeTransform = field(default=lambda u: u)  # unused: levels come from the curriculum
    process: ForwardProcess = field(default_factory=EDMSchedule)  # the student's
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    weighting: str = "log-normal"  # or "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    start_levels: int = 10
    max_levels: int = 1280
    double_every_kimg: float = 8.0
    huber_c: float = 0.0
    teacher: Callable[[torch.device], Denoiser] | None = None  # loads the teacher on a device
    teacher_solver: str = "heun"
    target: str = "online"  # theta^-: "online" (mu = 0, improved CT) or "ema" (the run's EMA)
    _teacher: Denoiser | None = field(default=None, repr=False)

    def prepare(self, device: torch.device) -> None:
        if self.teacher is not None and self._teacher is None:
            self._teacher = self.teacher(device)

    def draw(self, batch_size, shape, generator, device, images_seen: int = 0) -> ConsistencyDraw:
        levels = consistency_levels(
            images_seen, self.start_levels, self.max_levels, self.double_every_kimg
        )
        sigmas = consistency_sigmas(levels, self.sigma_min, self.sigma_max, self.rho)
        if self.weighting == "uniform":
            weights = torch.ones(len(sigmas) - 1, device=device)
        else:  # the log-normal's mass between neighbouring levels
            erf = torch.special.erf((sigmas.log() - self.p_mean) / (2**0.5 * self.p_std))
            weights = (erf[1:] - erf[:-1]).clamp_min(1e-12).to(device=device, dtype=torch.float32)
        n = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        eps = torch.randn((batch_size, *shape), generator=generator, device=device)
        times = self.process.t_from_ratio(sigmas).to(device=device, dtype=torch.float32)
        sigmas = sigmas.to(device=device, dtype=torch.float32)
        return ConsistencyDraw(times[n + 1], eps, times[n], sigmas[n + 1], sigmas[n])

    def loss(self, denoiser, x0, draw, labels=None, target=None) -> Tensor:
        x_high = x0 + _per_sample(draw.s, x0.ndim) * draw.eps
        x_low = self._step_back(x_high, draw, labels) if self.teacher else None
        if x_low is None:
            x_low = x0 + _per_sample(draw.s_low, x0.ndim) * draw.eps
        with _same_dropout(x0.device):  # the RNG goes back: the target draws these masks
            online = _x0_at(denoiser, x_high, draw.s, labels)
        with torch.no_grad():  # theta^-: the run's EMA ("ema") or these weights ("online")
            theirs = target if self.target == "ema" else denoiser  # validate: an EMA exists
            goal = _x0_at(theirs, x_low, draw.s_low, labels)
        dims = x0[0].numel()
        c = self.huber_c or 0.00054 * dims**0.5
        distance = ((online - goal).flatten(1).pow(2).sum(1) + c**2).sqrt() - c
        return distance if self.weighting == "uniform" else distance / (draw.s - draw.s_low)

    @torch.no_grad()
    def _step_back(self, x_high: Tensor, draw: ConsistencyDraw, labels: Tensor | None) -> Tensor:
        """One step of the teacher's probability-flow ODE from sigma_{n+1} to sigma_n, in EDM's
        variables (dy/ds = (y - D(y, s)) / s), whatever the teacher's own process (Euler, or
        Heun: Karras et al. 2022, Algorithm 1)."""
        teacher, high, low = self._teacher, draw.s, draw.s_low

        def slope(y: Tensor, s: Tensor) -> Tensor:
            return (y - _x0_at(teacher, y, s, labels)) / _per_sample(s, y.ndim)

        h = _per_sample(low - high, x_high.ndim)
        d = slope(x_high, high)
        y = x_high + h * d
        if self.teacher_solver == "heun":
            y = x_high + h * 0.5 * (d + slope(y, low))
        return y
