"""Forward processes: how a clean image x0 and Gaussian noise eps mix at time t.

Every process is the same value object: ``x_t = alpha(t) * x0 + sigma(t) * eps`` with time running
from clean (small t) to pure noise (``t_max``). Samplers walk a descending grid of times; the
last grid point is always the clean end (``sigma == 0``).

The network never sees t directly: ``noise_condition(t)`` is what a process shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample vector [N] so it broadcasts over images [N, C, H, W]."""
    return values.reshape(-1, *([1] * (ndim - 1)))


class ForwardProcess:
    """Base class: subclasses define ``alpha_sigma`` and the grid of times samplers walk."""

    name: str = "process"
    t_max: float = 1.0
    t_min: float = 0.0
    #: alpha^2 + sigma^2 == 1 (DDPM family): needed by DDIM and ancestral sampling.
    variance_preserving: bool = False
    #: alpha == 1 (EDM family): needed by the stochastic EDM sampler.
    variance_exploding: bool = False
    #: alpha and sigma are differentiable in t: needed by the Euler and Heun ODE samplers.
    differentiable: bool = True

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """d alpha / dt and d sigma / dt (for the probability-flow ODE)."""
        raise NotImplementedError

    def noise_condition(self, t: Tensor) -> Tensor:
        """The scalar the network receives for time t (one per sample)."""
        return t

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        """Time at which sigma / alpha equals ``ratio`` (EDM's sigma of the equivalent VE process)."""
        raise NotImplementedError

    def grid(self, num_steps: int) -> Tensor:
        """Default descending time grid with ``num_steps`` intervals, ending at the clean end."""
        return torch.linspace(self.t_max, self.t_min, num_steps + 1, dtype=torch.float64)

    def mix(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, t given per sample."""
        alpha, sigma = self.alpha_sigma(t)
        return _per_sample(alpha, x0.ndim) * x0 + _per_sample(sigma, x0.ndim) * eps


@dataclass
class LinearPath(ForwardProcess):
    """The straight path x_t = (1 - t) x0 + t eps, t in [0, 1].

    Rectified flow (Liu et al. 2022, eq. 1) and conditional flow matching with the OT path
    (Lipman et al. 2022, eq. 20 with sigma_min = 0) use exactly this path. It is also the tutorial's
    path: its ``time_bar`` value is t.
    """

    name: str = "linear-path"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 - t, t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        return ratio / (1.0 + ratio)


@dataclass
class TutorialPath(LinearPath):
    """The tutorial's process: the linear path seen only at ``num_levels + 1`` discrete levels.

    ``time_bar = 1 - linspace(0, 1, num_levels + 1)``; level k has t = time_bar[k], so level 0 is
    pure noise and level ``num_levels`` is clean. The network is told the raw integer level k.
    """

    name: str = "tutorial-path"
    num_levels: int = 16
    differentiable: bool = False

    @property
    def time_bar(self) -> Tensor:
        return 1.0 - torch.linspace(0.0, 1.0, self.num_levels + 1, dtype=torch.float64)

    def level(self, t: Tensor) -> Tensor:
        return torch.round((1.0 - t) * self.num_levels)

    def noise_condition(self, t: Tensor) -> Tensor:
        return self.level(t).float()

    def grid(self, num_steps: int) -> Tensor:
        return self.time_bar


@dataclass
class DDPMSchedule(ForwardProcess):
    """Discrete variance-preserving process of DDPM (Ho et al. 2020).

    Time is ``t = i / T`` for step i in 0..T; i = 0 is clean. ``alpha_bar_i = prod_{j<=i}(1 -
    beta_j)`` (Ho et al. eq. 4), alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar): the square
    roots keep the variance of x_t at 1 for unit-variance data.
    """

    name: str = "ddpm"
    num_timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance_preserving: bool = True
    differentiable: bool = False
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.alpha_bar = torch.cat(
            [torch.ones(1, dtype=torch.float64), self.betas().neg().add(1).cumprod(0)]
        )

    def betas(self) -> Tensor:
        steps = self.num_timesteps
        if self.schedule == "linear":  # Ho et al. 2020, sec. 4
            return torch.linspace(self.beta_start, self.beta_end, steps, dtype=torch.float64)
        # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), betas clipped at 0.999.
        s = 0.008
        i = torch.arange(steps + 1, dtype=torch.float64)
        f = torch.cos((i / steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._cache:
            self._cache[device] = self.alpha_bar.to(device)
        return self._cache[device]

    def index(self, t: Tensor) -> Tensor:
        return torch.round(t.double() * self.num_timesteps).long().clamp(0, self.num_timesteps)

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        return self._table(t.device)[self.index(t)].to(t.dtype)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha_bar = self.alpha_bar_at(t)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        """The step whose sigma/alpha = sqrt((1 - ab) / ab) is nearest to ``ratio`` (from above)."""
        table = ((1 - self._table(ratio.device)) / self._table(ratio.device)).sqrt()
        index = torch.searchsorted(table, ratio.to(table.dtype)).clamp_max(self.num_timesteps)
        return index.to(torch.float64) / self.num_timesteps

    def grid(self, num_steps: int) -> Tensor:
        # Evenly respaced steps T..0 (Nichol & Dhariwal 2021, sec. 4), the grid starting at T
        # ("trailing" spacing in Lin et al. 2024, arXiv:2305.08891, Table 2).
        steps = torch.linspace(self.num_timesteps, 0, num_steps + 1, dtype=torch.float64).round()
        return steps / self.num_timesteps


@dataclass
class EDMSchedule(ForwardProcess):
    """Variance-exploding process of EDM (Karras et al. 2022, Table 1): alpha = 1, sigma = t."""

    name: str = "edm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    variance_exploding: bool = True

    def __post_init__(self) -> None:
        self.t_max, self.t_min = self.sigma_max, 0.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(t), torch.ones_like(t)

    def noise_condition(self, t: Tensor) -> Tensor:
        return t.clamp_min(1e-20).log() / 4  # c_noise, Karras et al. 2022, Table 1

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        return ratio

    def grid(self, num_steps: int) -> Tensor:
        return edm_sigma_grid(num_steps, self.sigma_min, self.sigma_max, self.rho)


def edm_sigma_grid(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """Karras et al. 2022, eq. 5: ``num_steps`` noise levels spaced evenly in sigma^(1/rho), then 0."""
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    inv_rho = 1.0 / rho
    sigmas = (
        sigma_max**inv_rho + i / (num_steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)
    ) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def ratio_grid(
    process: ForwardProcess, num_steps: int, rho: float = 7.0, sigma_max: float = 0.0
) -> Tensor:
    """EDM's rho-spaced grid mapped onto any process through sigma / alpha (e.g. the flow path).

    The range is the process's own where it has one (EDM's sigma_min, sigma_max), else EDM's
    defaults 0.002..80 (Karras et al. 2022, sec. 5); ``sigma_max`` > 0 moves its top.
    """
    sigma_min, sigma_max = ratio_range(process, sigma_max)
    return _on_process(process, edm_sigma_grid(num_steps, sigma_min, sigma_max, rho))


def logsnr_grid(
    process: ForwardProcess, num_steps: int, rho: float = 7.0, sigma_max: float = 0.0
) -> Tensor:
    """``num_steps`` noise levels evenly spaced in log SNR over the same range as
    ``ratio_grid``, then the clean end (DPM-Solver's "logSNR" schedule, Lu et al. 2022, sec. 3.4;
    ``rho`` is not used)."""
    sigma_min, sigma_max = ratio_range(process, sigma_max)
    ratios = torch.logspace(
        math.log10(sigma_max), math.log10(sigma_min), num_steps, dtype=torch.float64
    )
    return _on_process(process, torch.cat([ratios, torch.zeros(1, dtype=torch.float64)]))


def few_step_grid(
    process: ForwardProcess, num_steps: int, rho: float = 7.0, sigma_max: float = 0.0
) -> Tensor:
    """The first ``num_steps`` levels of EDM's rho grid with one more level, then the clean end
    (1 step: sigma_max; 2 steps: sigma_max and about 2.5 at rho = 7). Unlike ``ratio_grid``, no
    evaluation is spent between sigma_min and 0, so k steps are k useful evaluations (the
    consistency sampler's levels, Song et al. 2023; diff-sampler's NFE count for iPNDM)."""
    sigma_min, sigma_max = ratio_range(process, sigma_max)
    levels = edm_sigma_grid(num_steps + 1, sigma_min, sigma_max, rho)[:num_steps]
    return _on_process(process, torch.cat([levels, torch.zeros(1, dtype=torch.float64)]))


def ratio_range(process: ForwardProcess, sigma_max: float = 0.0) -> tuple[float, float]:
    """(lowest, top) level of the ratio grids as sigma / alpha: the process's own where it has
    them, else EDM's 0.002 and 80; ``sigma_max`` > 0 moves the top."""
    top = sigma_max or getattr(process, "sigma_max", 80.0)
    return getattr(process, "sigma_min", 0.002), top


def _on_process(process: ForwardProcess, ratios: Tensor) -> Tensor:
    # A discrete process (DDPM) maps neighbouring levels to the same step: keep one of each.
    return torch.unique_consecutive(process.t_from_ratio(ratios))


def consistency_levels(images_seen: int, start: int, end: int, double_every_kimg: float) -> int:
    """N(k), the number of noise levels of consistency training at this point of the run:
    min(s0 * 2^floor(k / K'), s1) + 1 (Song & Dhariwal 2023, eq. 8), with k counted in images
    (every ``double_every_kimg`` thousand images the discretisation doubles)."""
    doublings = min(math.floor(images_seen / (1000 * double_every_kimg)), 62)
    return min(start * 2**doublings, end) + 1


def consistency_sigmas(levels: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """The ``levels`` noise levels of the discretisation, ascending: Karras et al.'s rho spacing
    (their eq. 5) from sigma_min to sigma_max, as consistency models use it."""
    return edm_sigma_grid(levels, sigma_min, sigma_max, rho)[:-1].flip(0)
