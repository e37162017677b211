"""Typed run configuration: presets (TOML files shipped in the package) plus overrides.

A config is built once at the edge: ``load_preset(name)`` or ``load_file(path)``, then
``apply_overrides(config, ["train.lr=1e-3", ...])``, then ``validate(config)``; it is written as
``config.json`` into the run directory and read back from there by every later command.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError
from difflab.limits import MAX_BATCH, MAX_IMAGES, MAX_SAMPLER_STEPS, MAX_STEPS, setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_VERSION = 1
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    source: str = "cifar10"  # "cifar10" or a path to an image folder
    class_name: str | None = None  # class name or index; None = all images
    image_size: int = setting(32, low=8, high=512)
    hflip: bool = True  # random horizontal flips while training


@dataclass
class UNetOptions:
    """Options of the modern U-Net (``network.name = "unet"``); see ``difflab.models.unet``."""

    channels: int = setting(64, low=2, high=2048)
    channel_mult: list[int] = setting([1, 2, 2], low=1, high=64, min_length=1)
    num_blocks: int = setting(2, low=1, high=64)
    attention_resolutions: list[int] = setting([8], low=1, high=512)
    dropout: float = setting(0.0, low=0, high=1, high_open=True)
    embedding: str = setting("fourier", choices=("fourier", "positional"))
    conditioning: str = setting("scale-shift", choices=("scale-shift", "additive"))
    num_heads: int = setting(1, low=1, high=256)
    num_classes: int = setting(0, low=0, high=100_000)


@dataclass
class NetworkConfig:
    name: str = "unet"  # "tutorial", "tutorial-keras" or "unet"
    unet: UNetOptions = field(default_factory=UNetOptions)


@dataclass
class MethodConfig:
    name: str = "edm"  # "tutorial", "ddpm", "ddpm-cosine", "flow" or "edm"
    prediction: str = setting("eps", choices=("eps", "x0", "v"))  # ddpm
    num_timesteps: int = setting(1000, low=1, high=100_000)  # ddpm
    beta_start: float = setting(1e-4, low=0, high=1, low_open=True, high_open=True)
    beta_end: float = setting(0.02, low=0, high=1, low_open=True, high_open=True)
    min_snr_gamma: float = setting(0.0, low=0)  # ddpm: 0 = plain MSE, else min-SNR weighting
    time_distribution: str = setting(  # flow
        "uniform", choices=("uniform", "logit-normal", "log-normal")
    )
    logit_mean: float = setting(0.0)
    logit_std: float = setting(1.0, low=0, low_open=True)
    p_mean: float = setting(-1.2)  # edm and flow "log-normal": ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = setting(1.2, low=0, low_open=True)
    sigma_data: float = setting(0.5, low=0, low_open=True)  # edm
    sigma_min: float = setting(0.002, low=0, low_open=True)
    sigma_max: float = setting(80.0, low=0, low_open=True)
    num_levels: int = setting(16, low=1, high=1000)  # tutorial
    stratified: bool = False  # spread the batch's noise levels evenly over their distribution


@dataclass
class SamplerConfig:
    name: str = ""  # empty: the method's default sampler
    steps: int = setting(0, low=0, high=MAX_SAMPLER_STEPS)  # 0: the method's default
    eta: float = setting(0.0, low=0, high=1)  # ddim
    clip_x0: bool = False  # ancestral, ddim: clip the x0 estimate to [-1, 1] (Ho et al. 2020)
    variance: str = setting("small", choices=("small", "large"))  # ancestral: beta_tilde or beta
    grid: str = setting("default", choices=("default", "edm"))  # edm: rho-spaced in sigma/alpha
    rho: float = setting(7.0, low=0, low_open=True, high=1000)
    s_churn: float = setting(40.0, low=0)  # edm-stochastic
    s_tmin: float = setting(0.05, low=0)
    s_tmax: float = setting(50.0, low=0, finite=False)
    s_noise: float = setting(1.003, low=0)


@dataclass
class TrainConfig:
    batch_size: int = setting(64, low=1, high=MAX_BATCH)  # global (split across processes)
    accumulation: int = setting(1, low=1, high=MAX_BATCH)  # micro-batches per optimizer step
    batching: str = setting("random", choices=("random", "epochs"))  # with replacement, passes
    steps: int = setting(10_000, low=0, high=MAX_STEPS)  # total optimizer steps (0 = no limit)
    images: int = setting(0, low=0, high=MAX_STEPS * MAX_BATCH)  # total images (0 = no limit)
    time_limit: float = setting(0.0, low=0, high=10**6)  # minutes of this invocation (0 = none)
    seed: int = setting(0, low=0, high=2**63 - 1)
    optimizer: str = setting("adam", choices=("adam", "adamw", "sgd"))  # sgd: momentum betas[0]
    lr: float = setting(1e-3, low=0, low_open=True)
    betas: list[float] = setting([0.9, 0.999], low=0, high=1, high_open=True, length=2)
    weight_decay: float = setting(0.0, low=0)
    lr_schedule: str = setting("constant", choices=("constant", "rounds", "cosine"))
    warmup_steps: int = setting(0, low=0, high=MAX_STEPS)
    round_steps: int = setting(2000, low=1, high=MAX_STEPS)  # "rounds": lr *= round_decay
    round_decay: float = setting(0.9, low=0, high=1, low_open=True)
    cosine_steps: int = setting(100_000, low=1, high=MAX_STEPS)  # "cosine": its horizon
    min_lr: float = setting(1e-6, low=0)
    grad_clip: float = setting(0.0, low=0)  # max global gradient norm; 0 = off
    ema_halflife_kimg: float = setting(500.0, low=0)  # 0 = no EMA (Karras et al. 2022: 500k)
    ema_rampup: float = setting(0.05, low=0)  # half-life at most this fraction of images seen
    checkpoint_every: int = setting(500, low=1, high=MAX_STEPS)  # steps
    keep_last: int = setting(2, low=1, high=10_000)  # rolling checkpoints kept
    snapshot_every: int = setting(0, low=0, high=MAX_STEPS)  # steps; kept forever (0 = none)
    sample_every_kimg: float = setting(50.0, low=0)  # pictures every this many kimg (0 = end)
    num_preview: int = setting(25, low=1, high=100)  # images in the preview grids
    log_every: int = setting(20, low=1, high=MAX_STEPS)  # steps between log rows
    eval_every_kimg: float = setting(0.0, low=0)  # FID/KID every this many kimg (0 = off)
    eval_num: int = setting(500, low=2, high=MAX_IMAGES)
    eval_ref: str = ""  # REF.npz from difflab ref (needed when eval_every_kimg > 0)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"))  # auto: devices.py
    compile: bool = False
    compile_mode: str = setting("default", choices=COMPILE_MODES)  # torch.compile's mode
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
    world_size: int = setting(1, low=1, high=MAX_STEPS)  # processes of the last training run
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
        text, name = _read_preset_file(Path(name_or_path)), Path(name_or_path).stem
    else:
        text, name = preset_text(name_or_path), name_or_path
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DifflabError(f"preset {name}: invalid TOML ({error})") from None
    except RecursionError:
        raise DifflabError(f"preset {name}: invalid TOML (nested too deeply)") from None
    # A preset says what it trains: an empty or partial file would train defaults unannounced.
    missing = [
        f"{section}.name"
        for section in ("method", "network")
        if not isinstance(values.get(section), dict) or "name" not in values[section]
    ]
    if missing:
        raise DifflabError(
            f"preset {name} does not set {' and '.join(missing)}; start from a shipped preset "
            "(src/difflab/presets/, listed by difflab presets)"
        )
    values.setdefault("preset", name)
    return from_dict(values)


def _read_preset_file(path: Path) -> str:
    if path.is_dir():
        raise DifflabError(f"preset {path} is a folder; give a .toml file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DifflabError(f"preset file {path} does not exist") from None
    except UnicodeDecodeError:
        raise DifflabError(f"preset file {path} is not a text (UTF-8 TOML) file") from None
    except OSError as error:
        raise DifflabError(f"cannot read preset file {path} ({error.strerror})") from None


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


def check_limits(section: Any, prefix: str = "") -> None:
    """Every field of a config (section) against its declared limits, naming the key."""
    for item in fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            check_limits(value, f"{prefix}{item.name}.")
        elif "limits" in item.metadata:
            item.metadata["limits"].check(value, f"{prefix}{item.name}")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate(config: Config) -> Config:
    """Declared limits, then what relates settings to each other (names of methods, networks
    and samplers are checked when the registry builds them)."""
    t, m = config.train, config.method
    _check(config.version == CONFIG_VERSION, f"config version {config.version} is not supported")
    check_limits(config)
    _check(
        _DEVICE.fullmatch(t.device) is not None,
        f"unknown device {t.device!r}; use auto, cpu, cuda, cuda:N or mps",
    )
    _check(
        t.batch_size % t.accumulation == 0,
        f"train.batch_size ({t.batch_size}) must be divisible by train.accumulation "
        f"({t.accumulation})",
    )
    _check(
        t.steps or t.images or t.time_limit,
        "set a training length: train.steps, train.images or train.time_limit (--steps, "
        "--images or --time-limit)",
    )
    _check(
        t.eval_every_kimg == 0 or t.eval_ref.endswith(".npz"),
        "train.eval_every_kimg needs train.eval_ref=REF.npz (make one with difflab ref)",
    )
    _check(
        m.beta_start < m.beta_end,
        f"method.beta_start ({m.beta_start}) must be below method.beta_end ({m.beta_end})",
    )
    _check(
        m.sigma_min < m.sigma_max,
        f"method.sigma_min ({m.sigma_min}) must be below method.sigma_max ({m.sigma_max})",
    )
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
    except OSError as error:
        raise DifflabError(f"cannot read {path} ({error.strerror})") from None
    if not isinstance(values, dict) or not isinstance(values.get("version"), int):
        raise DifflabError(
            f"{path} is not a difflab config (no version number): this folder was not written "
            "by difflab train"
        )
    version = values["version"]
    if version != CONFIG_VERSION:
        raise DifflabError(
            f"{path} was written by an incompatible difflab (config version {version}, "
            f"this one reads {CONFIG_VERSION})"
        )
    return validate(from_dict(values))
