"""Where the names users type become objects: networks and methods (samplers: ``plans``).

Adding a method means adding one ``Method`` builder here (and its maths in schedules /
denoisers / objectives); nothing else branches on method names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from difflab.config import (
    Config,
    ConsistencyMethod,
    FlowMethod,
    MethodConfig,
    NetworkConfig,
)
from difflab.denoisers import (
    ConsistencyParameterization,
    Denoiser,
    EDMPreconditioning,
    EpsilonPrediction,
    NextStepPrediction,
    Parameterization,
    SamplePrediction,
    VelocityPrediction,
    VPrediction,
)
from difflab.errors import DifflabError, unknown_choice
from difflab.objectives import (
    ConsistencyObjective,
    Objective,
    discrete_times,
    log_normal_sigma_times,
    logit_normal_times,
    uniform_times,
)
from difflab.schedules import (
    DDPMSchedule,
    EDMSchedule,
    ForwardProcess,
    LinearPath,
    TutorialPath,
)

# --------------------------------------------------------------------------- networks


def _tutorial_net(variant: str) -> Callable[[NetworkConfig, int, int], nn.Module]:
    def build(config: NetworkConfig, image_channels: int, image_size: int) -> nn.Module:
        from difflab.models import TutorialUNet

        return TutorialUNet(image_channels=image_channels, image_size=image_size, variant=variant)

    return build


def _unet(config: NetworkConfig, image_channels: int, image_size: int) -> nn.Module:
    from difflab.models import UNet, UNetConfig

    options = asdict(config.unet)
    options["channel_mult"] = tuple(options["channel_mult"])
    options["attention_resolutions"] = tuple(options["attention_resolutions"])
    return UNet(image_channels=image_channels, image_size=image_size, config=UNetConfig(**options))


NETWORKS: dict[str, Callable[[NetworkConfig, int, int], nn.Module]] = {
    "tutorial": _tutorial_net("pytorch"),
    "tutorial-keras": _tutorial_net("keras"),
    "unet": _unet,
}


def build_network(config: Config, image_channels: int = 3) -> nn.Module:
    build = NETWORKS.get(config.network.name)
    if build is None:
        raise unknown_choice("network", config.network.name, NETWORKS)
    return build(config.network, image_channels, config.data.image_size)


# --------------------------------------------------------------------------- methods


@dataclass
class Method:
    """Everything that defines a diffusion method, built from its config section."""

    name: str
    process: ForwardProcess
    parameterization: Parameterization
    objective: Objective
    default_sampler: str
    default_steps: int

    def denoiser(self, net: nn.Module) -> Denoiser:
        return Denoiser(net, self.process, self.parameterization)


def _tutorial(m: MethodConfig) -> Method:
    num_levels = m.tutorial.num_levels
    process = TutorialPath(num_levels=num_levels)
    levels = process.time_bar[:-1]  # t for k = 0..num_levels-1: never the clean end
    return Method(
        "tutorial",
        process,
        NextStepPrediction(process, step=1.0 / num_levels),
        Objective(discrete_times(levels), norm="l1", stratified=m.stratified),
        default_sampler="tutorial",
        default_steps=num_levels,
    )


PREDICTIONS: dict[str, Callable[[], Parameterization]] = {
    "eps": EpsilonPrediction,
    "x0": SamplePrediction,
    "v": VPrediction,
}


def _ddpm(m: MethodConfig, schedule: str = "linear") -> Method:
    d = m.ddpm
    if d.prediction not in PREDICTIONS:
        raise unknown_choice("DDPM prediction (method.ddpm.prediction)", d.prediction, PREDICTIONS)
    process = DDPMSchedule(
        num_timesteps=d.num_timesteps,
        schedule=schedule,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
    )
    steps = torch.arange(1, d.num_timesteps + 1, dtype=torch.float64) / d.num_timesteps
    objective = Objective(
        discrete_times(steps), norm="l2", min_snr_gamma=d.min_snr_gamma, stratified=m.stratified
    )
    return Method(
        "ddpm" if schedule == "linear" else "ddpm-cosine",
        process,
        PREDICTIONS[d.prediction](),
        objective,
        default_sampler="ancestral",
        default_steps=d.num_timesteps,
    )


def _flow_times(f: FlowMethod, process: ForwardProcess):
    if f.time_distribution == "uniform":
        return uniform_times(0.0, 1.0)
    if f.time_distribution == "logit-normal":
        return logit_normal_times(f.logit_mean, f.logit_std)
    if f.time_distribution == "log-normal":
        return log_normal_sigma_times(process, f.p_mean, f.p_std)
    raise unknown_choice(
        "time distribution (method.flow.time_distribution)",
        f.time_distribution,
        ["uniform", "logit-normal", "log-normal"],
    )


def _flow(m: MethodConfig) -> Method:
    process = LinearPath()
    objective = Objective(_flow_times(m.flow, process), norm="l2", stratified=m.stratified)
    return Method("flow", process, VelocityPrediction(), objective, "heun", 18)


def _edm(m: MethodConfig) -> Method:
    e = m.edm
    process = EDMSchedule(sigma_min=e.sigma_min, sigma_max=e.sigma_max)
    objective = Objective(
        log_normal_sigma_times(process, e.p_mean, e.p_std), norm="l2", stratified=m.stratified
    )
    return Method("edm", process, EDMPreconditioning(e.sigma_data), objective, "edm", 18)


#: The diffusion model a consistency function is built on (``method.consistency.base``): its
#: forward process and parameterization; a distilled student takes its teacher's.
CONSISTENCY_BASES: dict[
    str, Callable[[ConsistencyMethod], tuple[ForwardProcess, Parameterization]]
] = {
    "edm": lambda c: (
        EDMSchedule(sigma_min=c.sigma_min, sigma_max=c.sigma_max),
        EDMPreconditioning(c.sigma_data),
    ),
    "flow": lambda c: (LinearPath(), VelocityPrediction()),
}


def _consistency(m: MethodConfig) -> Method:
    c = m.consistency
    process, inner = CONSISTENCY_BASES[c.base](c)
    objective = ConsistencyObjective(
        process=process,
        sigma_min=c.sigma_min,
        sigma_max=c.sigma_max,
        rho=c.rho,
        weighting=c.weighting,
        p_mean=c.p_mean,
        p_std=c.p_std,
        start_levels=c.start_levels,
        max_levels=c.max_levels,
        double_every_kimg=c.double_every_kimg,
        huber_c=c.huber_c,
        teacher=functools.partial(_load_teacher, c) if c.teacher else None,
        teacher_solver=c.teacher_solver,
        target=c.target,
    )
    parameterization = ConsistencyParameterization(inner, c.sigma_min)
    return Method("consistency", process, parameterization, objective, "consistency", 1)


def _load_teacher(c: ConsistencyMethod, device: torch.device) -> Denoiser:
    """A diffusion run (or export) as a frozen denoiser on ``device``: what distillation asks;
    autoguided by ``c.teacher_guide`` (a weaker model of its kind) at ``c.teacher_guidance`` if
    one is named, and holding the weights ``c.teacher_digest`` names if it names any."""
    from difflab.train.checkpoint import weights_digest

    net, weak, config = teacher_models(c, device)
    if c.teacher_digest and weights_digest(net, *filter(None, [weak])) != c.teacher_digest:
        which = " and ".join(where for where in (c.teacher, c.teacher_guide) if where)
        raise DifflabError(
            f"{which} hold other weights than this student's teacher had (a run trained on since, "
            "or another one): name the weights it was distilled from, or distil again"
        )
    teacher = build_method(config)
    weaker = None if weak is None else teacher.denoiser(weak)
    return teacher.denoiser(net).bind(None, c.teacher_guidance, weaker)


def teacher_models(
    c: ConsistencyMethod, device: torch.device | str = "cpu"
) -> tuple[nn.Module, nn.Module | None, Config]:
    """The teacher's network and its guide's (or None), frozen on ``device``, and its config.
    A guide that is the teacher's export itself means the guide that export carries."""
    from difflab.train.checkpoint import load_model
    from difflab.train.guides import model_guide

    def build(config):
        return build_network(config).to(device).eval().requires_grad_(False)

    path, guide = c.teacher, c.teacher_guide
    gone = {key: where for key, where in (("teacher", path), ("teacher_guide", guide))
            if where and not Path(where).exists()}  # fmt: skip
    if gone:
        sets = " ".join(f"--set method.consistency.{key}='NEW PATH'" for key in gone)
        raise DifflabError(f"{' and '.join(gone.values())} (the {' and '.join(gone)}) not found; "
                           f"if moved, resume with {sets}")  # fmt: skip
    loaded = load_model(path, build)
    if build_method(loaded.config).parameterization.name == "consistency":
        raise DifflabError(f"the teacher {path} is a consistency model; distil a diffusion run")
    weak = model_guide(Path(path), loaded.config, build, loaded.step, guide) if guide else None
    return loaded.net, weak, loaded.config


METHODS: dict[str, Callable[[MethodConfig], Method]] = {
    "tutorial": _tutorial,
    "ddpm": _ddpm,
    "ddpm-cosine": functools.partial(_ddpm, schedule="cosine"),
    "flow": _flow,
    "edm": _edm,
    "consistency": _consistency,
}


def build_method(config: Config) -> Method:
    build = METHODS.get(config.method.name)
    if build is None:
        raise unknown_choice("method", config.method.name, METHODS)
    return build(config.method)
