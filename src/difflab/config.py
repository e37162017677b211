"""Typed run configuration: presets (TOML files shipped in the package) plus overrides.

A config is built once at the edge: ``load_preset(name)`` or ``load_file(path)``, then
``apply_overrides(config, ["train.lr=1e-3", ...])``, then ``validate(config)``; it is written as
``config.json`` into the run directory and read back from there by every later command.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_VERSION = 1


@dataclass
class DataConfig:
    source: str = "cifar10"  # "cifar10" or a path to an image folder
    class_name: str | None = None  # class name or index; None = all images
    image_size: int = 32
    hflip: bool = True  # random horizontal flips while training


@dataclass
class UNetOptions:
    """Options of the modern U-Net (``network.name = "unet"``); see ``difflab.models.unet``."""

    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [8])
    dropout: float = 0.0
    embedding: str = "fourier"
    conditioning: str = "scale-shift"
    num_heads: int = 1
    num_classes: int = 0


@dataclass
class NetworkConfig:
    name: str = "unet"  # "tutorial", "tutorial-keras" or "unet"
    unet: UNetOptions = field(default_factory=UNetOptions)


@dataclass
class MethodConfig:
    name: str = "edm"  # "tutorial", "ddpm", "ddpm-cosine", "flow" or "edm"
    prediction: str = "eps"  # ddpm: "eps", "x0" or "v"
    num_timesteps: int = 1000  # ddpm
    beta_start: float = 1e-4  # ddpm, linear schedule
    beta_end: float = 0.02
    min_snr_gamma: float = 0.0  # ddpm: 0 = plain MSE, else min-SNR weighting (e.g. 5)
    time_distribution: str = "uniform"  # flow: "uniform", "logit-normal" or "log-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    p_mean: float = -1.2  # edm and flow "log-normal": ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    sigma_data: float = 0.5  # edm
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    num_levels: int = 16  # tutorial
    stratified: bool = False  # spread the batch's noise levels evenly over their distribution


@dataclass
class SamplerConfig:
    name: str = ""  # empty: the method's default sampler
    steps: int = 0  # 0: the method's default number of steps
    eta: float = 0.0  # ddim
    clip_x0: bool = False  # ancestral, ddim: clip the x0 estimate to [-1, 1] (Ho et al. 2020)
    variance: str = "small"  # ancestral: posterior beta_tilde ("small") or beta ("large")
    grid: str = "default"  # "default" (the process's own) or "edm" (rho-spaced in sigma/alpha)
    rho: float = 7.0
    s_churn: float = 40.0  # edm-stochastic
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003


@dataclass
class TrainConfig:
    batch_size: int = 64  # global batch (split across processes under torchrun)
    accumulation: int = 1  # micro-batches per optimizer step
    batching: str = "random"  # "epochs" (shuffled passes) or "random" (with replacement)
    steps: int = 10_000  # total optimizer steps of the run (0 = no step limit)
    images: int = 0  # total training images of the run (0 = no limit)
    time_limit: float = 0.0  # minutes of wall clock for this invocation (0 = no limit)
    seed: int = 0
    optimizer: str = "adam"  # "adam", "adamw" or "sgd" (momentum betas[0])
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "constant", "rounds" (the tutorial's) or "cosine"
    warmup_steps: int = 0
    round_steps: int = 2000  # "rounds": lr *= round_decay after every round_steps steps
    round_decay: float = 0.9
    cosine_steps: int = 100_000  # "cosine": horizon of the decay, independent of --steps
    min_lr: float = 1e-6
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    ema_halflife_kimg: float = 500.0  # 0 = no EMA (Karras et al. 2022: 500k images)
    ema_rampup: float = 0.05  # half-life at most this fraction of the images seen
    checkpoint_every: int = 500  # steps
    keep_last: int = 2  # rolling checkpoints kept
    snapshot_every: int = 0  # steps; kept forever for evaluation over time (0 = none)
    sample_every_kimg: float = 50.0  # picture interval in thousands of images (0 = only at end)
    num_preview: int = 25  # images in the preview grids
    log_every: int = 20  # steps between log rows
    eval_every_kimg: float = 0.0  # FID/KID of eval_num samples every this many kimg (0 = off)
    eval_num: int = 500
    eval_ref: str = ""  # REF.npz from difflab ref (needed when eval_every_kimg > 0)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    precision: str = "auto"  # "auto" (CUDA: bf16 for big steps, see devices.py), "fp32", "bf16"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead, max-autotune, ...
    channels_last: bool = False
    fused_optimizer: bool = True  # Adam/AdamW's fused CUDA kernel (no effect on the CPU)


@dataclass
class Config:
    preset: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    world_size: int = 1  # recorded by the trainer: processes of the last training invocation
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------- building


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except DifflabError:
                continue
        raise DifflabError(f"{key}: {value!r} is not a valid value")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise DifflabError(f"{key}: expected a list like [1, 2], got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise DifflabError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DifflabError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise DifflabError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise DifflabError(f"{key}: expected a string, got {value!r}")
    raise DifflabError(f"{key}: unsupported value {value!r}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from nested dicts, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise DifflabError(f"{prefix.rstrip('.') or 'config'}: expected a table of settings")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DifflabError(
            f"unknown setting {prefix}{unknown[0]}; known settings in "
            f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


def preset_names() -> list[str]:
    folder = resources.files("difflab") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise DifflabError(
            f"unknown preset {name!r}; choose one of: {', '.join(preset_names())} "
            "(or pass a .toml file)"
        )
    return (resources.files("difflab") / "presets" / f"{name}.toml").read_text()


def load_preset(name_or_path: str) -> Config:
    """A shipped preset by name, or a user's TOML file in the same format."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise DifflabError(f"preset file {path} does not exist")
        text, name = path.read_text(), path.stem
    else:
        text, name = preset_text(name_or_path), name_or_path
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DifflabError(f"preset {name}: invalid TOML ({error})") from None
    except RecursionError:
        raise DifflabError(f"preset {name}: invalid TOML (nested too deeply)") from None
    values.setdefault("preset", name)
    return from_dict(values)


def parse_value(text: str) -> Any:
    """A TOML literal (1e-3, true, [1, 2], "x"), else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # deep nesting overflows tomllib's stack
        return text


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings; unknown keys and wrong types are errors."""
    values = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DifflabError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-3")
        *parents, leaf = key.strip().split(".")
        node = values
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise DifflabError(f"unknown setting {key.strip()}; see config.json of a run")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            raise DifflabError(f"unknown setting {key.strip()}; see config.json of a run")
        node[leaf] = parse_value(raw.strip())
    return from_dict(values)


# --------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DifflabError(message)


def _finite_positive(value: float, key: str) -> None:
    _check(math.isfinite(value) and value > 0, f"{key} must be a positive number, got {value}")


def _nan_setting(values: dict[str, Any], prefix: str = "") -> str | None:
    """The first setting that is (or holds) NaN, as ``section.key``."""
    for key, value in values.items():
        if isinstance(value, dict):
            found = _nan_setting(value, f"{prefix}{key}.")
            if found:
                return found
        elif any(isinstance(v, float) and math.isnan(v) for v in _as_list(value)):
            return f"{prefix}{key}"
    return None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate(config: Config) -> Config:
    """Range checks that do not need the registry (names are checked when objects are built)."""
    d, t, m, s = config.data, config.train, config.method, config.sampler
    _check(config.version == CONFIG_VERSION, f"config version {config.version} is not supported")
    _check(
        _DEVICE.fullmatch(t.device) is not None,
        f"unknown device {t.device!r}; use auto, cpu, cuda, cuda:N or mps",
    )
    _check(d.image_size >= 8, f"data.image_size must be at least 8, got {d.image_size}")
    _check(t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}")
    _check(t.accumulation >= 1, f"train.accumulation must be at least 1, got {t.accumulation}")
    _check(
        t.batch_size % t.accumulation == 0,
        f"train.batch_size ({t.batch_size}) must be divisible by train.accumulation "
        f"({t.accumulation})",
    )
    for key in ("steps", "images", "warmup_steps", "keep_last", "snapshot_every", "seed"):
        _check(getattr(t, key) >= 0, f"train.{key} must not be negative, got {getattr(t, key)}")
    _check(
        t.steps or t.images or t.time_limit,
        "set a training length: --steps, --images or --time-limit",
    )
    _check(t.time_limit >= 0 and math.isfinite(t.time_limit), "train.time_limit must be >= 0")
    for key in ("checkpoint_every", "round_steps", "cosine_steps", "log_every", "num_preview"):
        _check(getattr(t, key) >= 1, f"train.{key} must be at least 1, got {getattr(t, key)}")
    _finite_positive(t.lr, "train.lr")
    _check(math.isfinite(t.min_lr) and t.min_lr >= 0, "train.min_lr must be >= 0")
    _check(0 < t.round_decay <= 1, f"train.round_decay must be in (0, 1], got {t.round_decay}")
    _check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas: two numbers in [0, 1)"
    )
    _check(
        t.weight_decay >= 0 and t.grad_clip >= 0, "train.weight_decay and grad_clip must be >= 0"
    )
    _check(t.ema_halflife_kimg >= 0 and t.ema_rampup >= 0, "train.ema_* must be >= 0")
    _check(t.sample_every_kimg >= 0, "train.sample_every_kimg must be >= 0")
    _check(t.eval_every_kimg >= 0 and t.eval_num >= 2, "train.eval_every_kimg >= 0, eval_num >= 2")
    _check(
        t.eval_every_kimg == 0 or t.eval_ref.endswith(".npz"),
        "train.eval_every_kimg needs train.eval_ref=REF.npz (make one with difflab ref)",
    )
    _check(t.batching in ("epochs", "random"), "train.batching must be 'epochs' or 'random'")
    _check(t.optimizer in ("adam", "adamw", "sgd"), "train.optimizer must be adam, adamw or sgd")
    _check(
        t.lr_schedule in ("constant", "rounds", "cosine"),
        "train.lr_schedule must be 'constant', 'rounds' or 'cosine'",
    )
    _check(t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16")
    _check(
        t.compile_mode in COMPILE_MODES,
        f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}",
    )
    _check(s.variance in ("small", "large"), "sampler.variance must be 'small' or 'large'")
    _check(
        m.num_timesteps >= 1 and m.num_levels >= 1, "method.num_timesteps/num_levels must be >= 1"
    )
    _check(0 < m.beta_start < m.beta_end < 1, "method.beta_start < beta_end, both in (0, 1)")
    for key in ("sigma_data", "sigma_min", "sigma_max", "p_std", "logit_std"):
        _finite_positive(getattr(m, key), f"method.{key}")
    _check(m.sigma_min < m.sigma_max, "method.sigma_min must be below method.sigma_max")
    _check(m.min_snr_gamma >= 0, "method.min_snr_gamma must be >= 0")
    for key in ("p_mean", "logit_mean"):
        _check(math.isfinite(getattr(m, key)), f"method.{key} must be a finite number")
    for key in ("s_churn", "s_tmin", "s_noise"):
        value = getattr(s, key)
        _check(math.isfinite(value) and value >= 0, f"sampler.{key} must be >= 0, got {value}")
    _check(s.s_tmax >= 0, f"sampler.s_tmax must be >= 0, got {s.s_tmax}")
    _check(s.steps >= 0, f"sampler.steps must not be negative, got {s.steps}")
    _check(0 <= s.eta <= 1, f"sampler.eta must be in [0, 1], got {s.eta}")
    _check(s.grid in ("default", "edm"), "sampler.grid must be 'default' or 'edm'")
    _finite_positive(s.rho, "sampler.rho")
    nan = _nan_setting(config.to_dict())
    _check(nan is None, f"{nan} must be a number, got nan")
    return config


def save_json(config: Config, path: Path) -> None:
    from difflab.io import atomic_write_text

    atomic_write_text(path, config.to_json() + "\n")


def load_json(path: Path) -> Config:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DifflabError(f"{path} not found: is this a difflab run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DifflabError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise DifflabError(f"{path} is not a difflab config")
    version = values.get("version")
    if version != CONFIG_VERSION:
        raise DifflabError(
            f"{path} was written by an incompatible difflab (config version {version}, "
            f"this one reads {CONFIG_VERSION})"
        )
    return validate(from_dict(values))
