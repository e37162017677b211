"""The config's schema: typed sections with declared ranges (``difflab.limits``).

``difflab.config`` loads, overrides, checks and stores them; everything else reads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from difflab.limits import MAX_BATCH, MAX_IMAGES, MAX_SAMPLER_STEPS, MAX_STEPS, setting

CONFIG_VERSION = 2  # 2: one options section per method (1 had them side by side)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Autoguidance's weight w where a guide is named and the run's own weight is 1 (Karras et al.
# 2024 use 1.4-2.5; the quality benchmark's flow-cpu samples at 2)
AUTOGUIDANCE = 2.0


@dataclass
class DataConfig:
    """The images: where from, which class, what size (``data.*``)."""

    source: str = "cifar10"  # "cifar10" or a path to an image folder
    class_name: str | None = None  # class name or index; None = all images
    image_size: int = setting(32, low=8, high=512)  # pixels; images resized, centre-cropped
    hflip: bool = True  # random horizontal flips while training
    conditional: bool = False  # learn p(x | class) for every class in the data (see classes.py)
    class_names: list[str] = field(default_factory=list)  # filled by difflab train from the data


@dataclass
class UNetOptions:
    """Options of the modern U-Net (``network.name = "unet"``); see ``difflab.models.unet``."""

    channels: int = setting(64, low=2, high=2048)  # base width; stage i has channel_mult[i] x
    channel_mult: list[int] = setting([1, 2, 2], low=1, high=64, min_length=1)  # one per stage
    num_blocks: int = setting(2, low=1, high=64)  # residual blocks per stage
    attention_resolutions: list[int] = setting([8], low=1, high=512)  # self-attention at these
    dropout: float = setting(0.0, low=0, high=1, high_open=True)  # in the residual blocks
    embedding: str = setting("fourier", choices=("fourier", "positional"))  # of the noise level
    conditioning: str = setting("scale-shift", choices=("scale-shift", "additive"))  # of a block
    num_heads: int = setting(1, low=1, high=256)  # attention heads
    num_classes: int = setting(0, low=0, high=100_000)  # class embeddings; set from the data


@dataclass
class NetworkConfig:
    """The network by name, and the U-Net's options (``network.*``)."""

    name: str = "unet"  # the tutorial's U-Nets (PyTorch, Keras) or the modern one
    unet: UNetOptions = field(default_factory=UNetOptions)


@dataclass
class TutorialMethod:
    """Options of "tutorial", the tutorial's method exactly (docs/methods.md)."""

    num_levels: int = setting(16, low=1, high=1000)  # the tutorial's time_bar levels


@dataclass
class DDPMMethod:
    """Options of "ddpm" (linear betas) and "ddpm-cosine" (Nichol & Dhariwal 2021)."""

    prediction: str = setting("eps", choices=("eps", "x0", "v"))  # what the network predicts
    num_timesteps: int = setting(1000, low=1, high=100_000)  # T, the discrete steps
    beta_start: float = setting(1e-4, low=0, high=1, low_open=True, high_open=True)  # linear
    beta_end: float = setting(0.02, low=0, high=1, low_open=True, high_open=True)  # linear
    min_snr_gamma: float = setting(0.0, low=0)  # 0 = plain MSE, else min-SNR weighting (e.g. 5)


@dataclass
class FlowMethod:
    """Options of "flow" (flow matching, the rectified-flow path x_t = (1 - t) x0 + t eps)."""

    # how training draws t in (0, 1)
    time_distribution: str = setting("uniform", choices=("uniform", "logit-normal", "log-normal"))
    logit_mean: float = setting(0.0)  # "logit-normal": t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = setting(1.0, low=0, low_open=True)  # "logit-normal"
    p_mean: float = setting(-1.2)  # "log-normal": ln(t / (1 - t)) ~ N(p_mean, p_std^2)
    p_std: float = setting(1.2, low=0, low_open=True)  # "log-normal"


@dataclass
class EDMMethod:
    """Options of "edm" (Karras et al. 2022: preconditioning, log-normal noise levels)."""

    p_mean: float = setting(-1.2)  # ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022)
    p_std: float = setting(1.2, low=0, low_open=True)  # see p_mean
    sigma_data: float = setting(0.5, low=0, low_open=True)  # the data's std (preconditioning)
    sigma_min: float = setting(0.002, low=0, low_open=True)  # the lowest noise level sampled
    sigma_max: float = setting(80.0, low=0, low_open=True)  # the highest; sampling starts here


@dataclass
class ConsistencyMethod:
    """Consistency models (Song et al. 2023; improved training, Song & Dhariwal 2023): one
    network maps any noise level straight to the clean end."""

    teacher: str = ""  # a diffusion run or export to distil from; "" = consistency training
    teacher_solver: str = setting("heun", choices=("heun", "euler"))  # its ODE step per pair
    # autoguidance of the teacher's ODE (Karras et al. 2024): a weaker model of its kind, and w
    teacher_guide: str = ""
    teacher_guidance: float = setting(AUTOGUIDANCE, low=0, high=100)  # w of teacher_guide
    # the fingerprint of the teacher's and its guide's weights when distilled (distill writes
    # it): a teacher moved on resume must hold the same weights
    teacher_digest: str = ""
    # the diffusion model f is built on (process, parameterization): distill takes the teacher's
    base: str = setting("edm", choices=("edm", "flow"))
    sigma_data: float = setting(0.5, low=0, low_open=True)  # as the edm section's
    sigma_min: float = setting(0.002, low=0, low_open=True)  # f(x, sigma_min) = x
    sigma_max: float = setting(80.0, low=0, low_open=True)  # the top of the levels
    rho: float = setting(7.0, low=1, high=1000)  # discretisation (Karras eq. 5); 1: even in sigma
    # which pairs of levels, weighted how: "log-normal" levels with lambda = 1 / (s_{n+1} - s_n)
    # (improved CT, Song & Dhariwal 2023), or "uniform" n with lambda = 1 (Song et al. 2023)
    weighting: str = setting("log-normal", choices=("log-normal", "uniform"))
    p_mean: float = setting(-1.1)  # log-normal levels: the mean and spread of log sigma
    p_std: float = setting(2.0, low=0, low_open=True)  # see p_mean
    # the curriculum N(k) (improved CT): start_levels levels at first, doubling every
    # double_every_kimg up to max_levels
    start_levels: int = setting(10, low=1, high=100_000)
    max_levels: int = setting(1280, low=1, high=100_000)  # the curriculum's last N
    double_every_kimg: float = setting(8.0, low=0, low_open=True)  # N doubles every this many kimg
    huber_c: float = setting(0.0, low=0)  # pseudo-Huber c; 0 = 0.00054 sqrt(dimensions)
    target: str = setting("online", choices=("online", "ema"))  # theta^-: mu = 0, or the EMA


#: The options section each method reads.
METHOD_SECTIONS = {
    "tutorial": "tutorial",
    "ddpm": "ddpm",
    "ddpm-cosine": "ddpm",
    "consistency": "consistency",
    "flow": "flow",
    "edm": "edm",
}


@dataclass
class MethodConfig:
    """The method's name, what all methods share, and one section of options per method; only
    the section of the chosen method is read and checked."""

    name: str = "edm"  # how images are noised and what the network learns (docs/methods.md)
    stratified: bool = False  # spread the batch's noise levels evenly over their distribution
    tutorial: TutorialMethod = field(default_factory=TutorialMethod)
    ddpm: DDPMMethod = field(default_factory=DDPMMethod)
    flow: FlowMethod = field(default_factory=FlowMethod)
    edm: EDMMethod = field(default_factory=EDMMethod)
    consistency: ConsistencyMethod = field(default_factory=ConsistencyMethod)

    @property
    def section(self) -> str | None:
        """The name of the options section the chosen method reads."""
        return METHOD_SECTIONS.get(self.name)


@dataclass
class SamplerConfig:
    """How a run samples by default (``sampler.*``); ``difflab sample`` and ``Run.plan``
    override it per call."""

    name: str = ""  # empty: the method's default sampler
    steps: int = setting(0, low=0, high=MAX_SAMPLER_STEPS)  # 0: the method's default
    eta: float = setting(0.0, low=0, high=1)  # ddim
    clip_x0: bool = False  # ancestral, ddim: clip the x0 estimate to [-1, 1] (Ho et al. 2020)
    variance: str = setting("small", choices=("small", "large"))  # ancestral: beta_tilde or beta
    # the time grid: the sampler's own ("default"), the process's, EDM's rho grid, even in
    # log SNR, or the few-step one (plans.GRIDS)
    grid: str = setting("default", choices=("default", "process", "edm", "logsnr", "few-step"))
    rho: float = setting(7.0, low=1, high=1000)  # the few-step, edm grids (Karras eq. 5); 1: even
    # The top of the edm, logsnr and few-step grids as sigma / alpha (0: the method's own, e.g.
    # 80); EDM's sampler's sigma_max. A consistency model's one step may do better from lower.
    sigma_max: float = setting(0.0, low=0, high=1e6)
    s_churn: float = setting(40.0, low=0)  # edm-stochastic
    s_tmin: float = setting(0.05, low=0)  # edm-stochastic: churn only at sigma >= s_tmin
    s_tmax: float = setting(50.0, low=0, finite=False)  # edm-stochastic: and <= s_tmax
    s_noise: float = setting(1.003, low=0)  # edm-stochastic: the added noise's scale
    guidance: float = setting(1.0, low=0, high=100)  # w (1 = plain): towards a label / from a guide
    # Autoguidance by the run's own EMA weights at this fraction of its steps (0: none); the
    # trainer keeps that checkpoint. With a guide, ``guidance`` guides away from it.
    guide_at: float = setting(0.0, low=0, high=1, high_open=True)

    def with_guide(self) -> SamplerConfig:
        """These settings for sampling with a guide that someone named (``--guide``,
        ``guide=``): the run's own weight, or AUTOGUIDANCE where that is 1, so that naming a
        guide is never silently a no-op."""
        return self if self.guidance != 1 else replace(self, guidance=AUTOGUIDANCE)


@dataclass
class TrainConfig:
    """Training: batch, length, optimizer and schedule, EMA, checkpoints, pictures, devices
    (``train.*``)."""

    batch_size: int = setting(64, low=1, high=MAX_BATCH)  # global (split across processes)
    accumulation: int = setting(1, low=1, high=MAX_BATCH)  # micro-batches per optimizer step
    batching: str = setting("random", choices=("random", "epochs"))  # with replacement, passes
    steps: int = setting(10_000, low=0, high=MAX_STEPS)  # total optimizer steps (0 = no limit)
    images: int = setting(0, low=0, high=MAX_STEPS * MAX_BATCH)  # total images (0 = no limit)
    time_limit: float = setting(0.0, low=0, high=10**6)  # minutes of this invocation (0 = none)
    seed: int = setting(0, low=0, high=2**63 - 1)  # network, batches, noise: all from it
    optimizer: str = setting("adam", choices=("adam", "adamw", "sgd"))  # sgd: momentum betas[0]
    lr: float = setting(1e-3, low=0, low_open=True)  # the peak learning rate
    # Adam's and AdamW's; sgd takes betas[0] as its momentum
    betas: list[float] = setting([0.9, 0.999], low=0, high=1, high_open=True, length=2)
    weight_decay: float = setting(0.0, low=0)  # adamw: decoupled; adam, sgd: L2
    # "rounds": the tutorial's; "cooldown": warm-up, stable, a linear decay over the end
    lr_schedule: str = setting("constant", choices=("constant", "rounds", "cosine", "cooldown"))
    warmup_steps: int = setting(0, low=0, high=MAX_STEPS)  # linear from 0 to lr
    round_steps: int = setting(2000, low=1, high=MAX_STEPS)  # "rounds": lr *= round_decay
    round_decay: float = setting(0.9, low=0, high=1, low_open=True)  # see round_steps
    cosine_steps: int = setting(100_000, low=1, high=MAX_STEPS)  # "cosine": its horizon
    cooldown: float = setting(0.2, low=0, high=1, high_open=True)  # "cooldown": share of the run
    min_lr: float = setting(1e-6, low=0)  # where "rounds", "cosine" and "cooldown" stop
    grad_clip: float = setting(0.0, low=0)  # max global gradient norm; 0 = off
    label_dropout: float = setting(0.1, low=0, high=1)  # conditional: P(label -> "no class")
    ema_halflife_kimg: float = setting(500.0, low=0)  # 0 = no EMA (Karras et al. 2022: 500k)
    ema_rampup: float = setting(0.05, low=0)  # half-life at most this fraction of images seen
    checkpoint_every: int = setting(500, low=1, high=MAX_STEPS)  # steps
    keep_last: int = setting(2, low=1, high=10_000)  # rolling checkpoints kept
    snapshot_every: int = setting(0, low=0, high=MAX_STEPS)  # steps; kept forever (0 = none)
    sample_every_kimg: float = setting(50.0, low=0)  # pictures every this many kimg (0 = end)
    num_preview: int = setting(25, low=1, high=100)  # images in the preview grids
    log_every: int = setting(20, low=1, high=MAX_STEPS)  # steps between log rows
    eval_every_kimg: float = setting(0.0, low=0)  # FID/KID every this many kimg (0 = off)
    eval_num: int = setting(500, low=2, high=MAX_IMAGES)  # samples per FID/KID point
    eval_ref: str = ""  # REF.npz from difflab ref (needed when eval_every_kimg > 0)
    device: str = "auto"  # where training runs; "auto": a CUDA or MPS GPU if there is one
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"))  # auto: devices.py
    compile: bool = False  # torch.compile the network (falls back to eager on failure)
    compile_mode: str = setting("default", choices=COMPILE_MODES)  # torch.compile's mode
    # The compiled graph's layout: channels-last throughout ("channels_last"), inductor's choice
    # ("inductor"), or "auto": channels-last on CUDA, inductor's elsewhere (compiled_layout)
    compile_layout: str = setting("auto", choices=("auto", "inductor", "channels_last"))
    channels_last: bool = False  # the module in channels-last memory format
    fused_optimizer: bool = True  # Adam/AdamW's fused CUDA kernel (no effect on the CPU)


@dataclass
class Config:
    """Every setting of a run, one section each; ``to_dict()`` is what config.json holds."""

    preset: str = "custom"  # the preset it started from (a name, or a .toml file's stem)
    description: str = ""  # one line on what the preset is for
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    world_size: int = setting(1, low=1, high=MAX_STEPS)  # processes of the last training run
    version: int = CONFIG_VERSION  # of this schema; older configs are upgraded when read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
