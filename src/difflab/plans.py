"""Where sampler and grid names become a ``SamplingPlan``: a sampler function, its options
and its time grid, checked against the method it will run on.

Adding a sampler means adding its function to ``samplers`` and one ``SamplerSpec`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from difflab import samplers as S
from difflab.config import SamplerConfig
from difflab.denoisers import Denoiser
from difflab.errors import DifflabError, unknown_choice
from difflab.registry import Method
from difflab.schedules import (
    ForwardProcess,
    TutorialPath,
    few_step_grid,
    logsnr_grid,
    ratio_grid,
    ratio_range,
)


@dataclass
class SamplerSpec:
    """A sampler function, the methods it is valid for, and how it reads its options."""

    function: Callable[..., Tensor]
    requires: Callable[[Method], bool]
    requirement: str
    options: Callable[[SamplerConfig], dict] = lambda s: {}
    grid: str = "process"  # the grid of sampler.grid = "default" (see GRIDS)


def _is_tutorial(m: Method) -> bool:
    return isinstance(m.process, TutorialPath)


def _is_consistency(m: Method) -> bool:
    return m.parameterization.name == "consistency"


def _ode(m: Method) -> bool:
    """A diffusion model whose denoiser defines an ODE with differentiable alpha, sigma."""
    return m.process.differentiable and not _is_consistency(m)


def _variance_preserving(m: Method) -> bool:
    return m.process.variance_preserving


def _diffusion(m: Method) -> bool:
    return not _is_tutorial(m) and not _is_consistency(m)


SAMPLERS: dict[str, SamplerSpec] = {
    "tutorial": SamplerSpec(S.tutorial_sampler, _is_tutorial, "a model of the tutorial method"),
    "ancestral": SamplerSpec(
        S.ancestral_sampler,
        _variance_preserving,
        "a DDPM-family (VP) model",
        lambda s: {"clip_x0": s.clip_x0, "variance": s.variance},
    ),
    "ddim": SamplerSpec(
        S.ddim_sampler,
        _variance_preserving,
        "a DDPM-family (VP) model",
        lambda s: {"eta": s.eta, "clip_x0": s.clip_x0},
    ),
    "euler": SamplerSpec(S.euler_sampler, _ode, "a flow or EDM model"),
    "heun": SamplerSpec(S.heun_sampler, _ode, "a flow or EDM model"),
    "edm": SamplerSpec(S.heun_sampler, _ode, "a flow or EDM model", grid="edm"),
    "edm-stochastic": SamplerSpec(
        S.edm_stochastic_sampler,
        lambda m: m.process.variance_exploding and not _is_consistency(m),
        "an EDM model",
        lambda s: {
            "s_churn": s.s_churn,
            "s_tmin": s.s_tmin,
            "s_tmax": s.s_tmax,
            "s_noise": s.s_noise,
        },
        grid="edm",
    ),
    "dpm++2m": SamplerSpec(S.dpmpp_2m_sampler, _diffusion, "a DDPM, flow or EDM model"),
    "ipndm": SamplerSpec(S.ipndm_sampler, _diffusion, "a DDPM, flow or EDM model", grid="few-step"),
    "consistency": SamplerSpec(
        S.consistency_sampler, _is_consistency, "a consistency model", grid="few-step"
    ),
}

#: Time grids by name: each maps (process, steps, rho, sigma_max) to a descending grid ending
#: clean (sigma_max: the top level as sigma / alpha, 0 for the process's own).
GRIDS: dict[str, Callable[[ForwardProcess, int, float, float], Tensor]] = {
    "process": lambda process, steps, rho, sigma_max: process.grid(steps),
    "edm": ratio_grid,
    "logsnr": logsnr_grid,
    "few-step": few_step_grid,
}


@dataclass
class SamplingPlan:
    """A resolved sampler: function, options and time grid, ready to call on a denoiser of
    the method it was built for (``fits``)."""

    name: str
    function: Callable[..., Tensor]
    options: dict
    grid: Tensor
    method: str = ""
    process: ForwardProcess | None = None

    def fits(self, method: Method) -> bool:
        """Whether this plan was built for ``method`` (its name and forward process)."""
        return (self.method, self.process) == (method.name, method.process)

    @property
    def num_steps(self) -> int:
        return len(self.grid) - 1

    def __call__(
        self,
        denoiser: Denoiser,
        noise: Tensor,
        rng: S.SampleNoise | Sequence[int] | None = None,
        on_step: S.StepCallback | None = None,
    ) -> Tensor:
        """Sample from ``noise`` (the grid's first level's); a sampler that draws fresh noise
        as it goes draws it from ``rng``, a ``SampleNoise`` or one seed per image."""
        if rng is None:
            rng = _NoNoise(self.name)
        elif not isinstance(rng, S.SampleNoise):
            rng = rng.tolist() if isinstance(rng, Tensor) else rng  # a tensor of seeds too
            if (
                isinstance(rng, str | bytes)
                or not isinstance(rng, Sequence)
                or len(rng) != len(noise)
            ):
                raise DifflabError(
                    f"rng must be a SampleNoise or one seed per image ({len(noise)}), got "
                    f"{type(rng).__name__}"
                )
            rng = S.SampleNoise(rng, noise.device)
        return self.function(denoiser, noise, self.grid, rng, on_step, **self.options)


class _NoNoise:
    """The noise of a plan called without any: an error, if its sampler draws some."""

    def __init__(self, sampler: str) -> None:
        self.sampler = sampler

    def randn(self, shape: Sequence[int]) -> Tensor:
        raise DifflabError(
            f"sampler {self.sampler!r} draws fresh noise as it goes: call the plan with "
            "rng=SampleNoise(seeds, device) or a list of one seed per image"
        )


def build_sampler(method: Method, sampler: SamplerConfig) -> SamplingPlan:
    name = sampler.name or method.default_sampler
    spec = SAMPLERS.get(name)
    if spec is None:
        raise unknown_choice("sampler", name, SAMPLERS)
    if not spec.requires(method):
        raise DifflabError(
            f"sampler {name!r} needs {spec.requirement}, but this run uses the {method.name} "
            f"method; its default sampler is {method.default_sampler!r}"
        )
    if sampler.eta and "eta" not in spec.options(sampler):
        raise DifflabError(f"eta is DDIM's; sampler {name!r} has none: drop --eta (sampler.eta)")
    steps = sampler.steps or method.default_steps
    if _is_tutorial(method) and steps != method.process.num_levels:
        raise DifflabError(
            f"the tutorial sampler only runs the {method.process.num_levels} levels it was "
            f"trained on; leave the steps at the default or give {method.process.num_levels}"
        )
    grid_name = spec.grid if sampler.grid == "default" else sampler.grid
    if grid_name != "process" and _is_tutorial(method):
        raise DifflabError(f"the {grid_name} grid is not defined for the tutorial method")
    if sampler.sigma_max and grid_name == "process":
        raise DifflabError(
            "sampler.sigma_max moves the top of the edm, logsnr and few-step grids; the process "
            "grid has its own: use --grid edm, or leave sigma_max at 0"
        )
    floor, _ = ratio_range(method.process)
    if 0 < sampler.sigma_max <= floor:
        raise DifflabError(
            f"sampler.sigma_max ({sampler.sigma_max:g}) must be above the grid's lowest level "
            f"({floor:g}); 0 keeps the method's own"
        )
    grid = GRIDS[grid_name](method.process, steps, sampler.rho, sampler.sigma_max)
    if name == "ipndm" and float(method.process.alpha_sigma(grid[:1])[0]) == 0:
        raise DifflabError(
            "ipndm needs a grid that starts below pure noise; use --grid edm or logsnr"
        )
    return SamplingPlan(
        name, spec.function, spec.options(sampler), grid, method.name, method.process
    )
