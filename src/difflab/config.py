"""Typed run configuration: presets (TOML files shipped in the package) plus overrides.

A config is built once at the edge: ``load_preset(name)`` or ``load_file(path)``, then
``apply_overrides(config, ["train.lr=1e-3", ...])``, then ``validate(config)``; it is written as
``config.json`` into the run directory and read back from there by every later command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import typing
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError
from difflab.schema import (
    COMPILE_MODES,
    CONFIG_VERSION,
    METHOD_SECTIONS,
    Config,
    ConsistencyMethod,
    DataConfig,
    DDPMMethod,
    EDMMethod,
    FlowMethod,
    MethodConfig,
    NetworkConfig,
    SamplerConfig,
    TrainConfig,
    TutorialMethod,
    UNetOptions,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The schema's classes are re-exported: difflab.config is where configs come from.
__all__ = [
    "COMPILE_MODES",
    "CONFIG_VERSION",
    "METHOD_SECTIONS",
    "Config",
    "ConsistencyMethod",
    "DDPMMethod",
    "DataConfig",
    "EDMMethod",
    "FlowMethod",
    "MethodConfig",
    "NetworkConfig",
    "SamplerConfig",
    "TrainConfig",
    "TutorialMethod",
    "UNetOptions",
    "apply_overrides",
    "from_dict",
    "load_json",
    "load_preset",
    "parse_value",
    "preset_names",
    "replace_checked",
    "save_json",
    "upgrade",
    "validate",
]

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
        moved = _moved_to(cls, unknown[0], prefix)
        where = prefix.rstrip(".") or "the config"
        advice = (
            f"it is {moved} now"
            if moved
            else f"known settings in {where}: {', '.join(sorted(known))}"
        )
        raise DifflabError(f"unknown setting {prefix}{unknown[0]}; {advice}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _moved_to(cls: type, name: str, prefix: str) -> str | None:
    """Where a setting called ``name`` lives one level down (``method.prediction`` became
    ``method.ddpm.prediction``), if it does."""
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        inner = hints[item.name]
        if dataclasses.is_dataclass(inner) and name in {f.name for f in fields(inner)}:
            return f"{prefix}{item.name}.{name}"
    return None


def from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


def first_difference(
    before: dict, after: dict, ignore: frozenset[str] | set[str] = frozenset()
) -> tuple[str, Any, Any] | None:
    """(dotted name, before, after) of the first setting, in name order, where two nested
    tables of settings differ (a setting one lacks is None there); ``ignore`` names settings
    that may differ."""
    old, new = _flatten(before), _flatten(after)
    keys = sorted((old.keys() | new.keys()) - ignore)
    key = next((k for k in keys if old.get(k) != new.get(k)), None)
    return None if key is None else (key, old.get(key), new.get(key))


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def replace_checked(section: Any, prefix: str, **changes: Any) -> Any:
    """``section`` (a config dataclass) with ``changes``, each checked as ``--set
    PREFIX.NAME=VALUE`` would be: an unknown name or a wrong type is a one-line error."""
    return _build(type(section), {**dataclasses.asdict(section), **changes}, prefix)


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


def load_preset(name_or_path: str | os.PathLike) -> Config:
    """A shipped preset by name, or a user's TOML file in the same format."""
    if not isinstance(name_or_path, str | os.PathLike) or isinstance(name_or_path, bytes):
        raise DifflabError(f"a preset is a name or a .toml path, got {name_or_path!r}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path.lower().endswith(".toml"):
        text, name = _read_preset_file(Path(name_or_path).expanduser()), Path(name_or_path).stem
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
        if isinstance(node.get(leaf), dict):
            raise DifflabError(
                f"{key.strip()} is a section; set one of its keys: {key.strip()}.KEY=..."
            )
        node[leaf] = parse_value(raw.strip())  # an unknown key is named by from_dict
    return from_dict(values)


# --------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DifflabError(message)


def check_limits(section: Any, prefix: str = "", skip: frozenset[str] = frozenset()) -> None:
    """Every field of a config (section) against its declared limits, naming the key; the
    sections named in ``skip`` (e.g. another method's options) are not read."""
    for item in fields(section):
        key, value = f"{prefix}{item.name}", getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            if key not in skip:
                check_limits(value, f"{key}.", skip)
        elif "limits" in item.metadata:
            item.metadata["limits"].check(value, key)


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate(config: Config) -> Config:
    """Declared limits, then what relates settings to each other (names of methods, networks
    and samplers are checked when the registry builds them). Of the method options, only the
    chosen method's section is checked: the others are not used."""
    t, m = config.train, config.method
    _check(
        config.version == CONFIG_VERSION,
        f"config version {config.version} is not supported (this difflab writes "
        f"{CONFIG_VERSION}); drop version from the preset, or start from a shipped one",
    )
    unused = frozenset(f"method.{name}" for name in set(METHOD_SECTIONS.values()) - {m.section})
    check_limits(config, skip=unused)
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
    d, e = m.ddpm, m.edm
    _check(
        m.section != "ddpm" or d.beta_start < d.beta_end,
        f"method.ddpm.beta_start ({d.beta_start}) must be below method.ddpm.beta_end "
        f"({d.beta_end})",
    )
    _check(
        m.section != "edm" or e.sigma_min < e.sigma_max,
        f"method.edm.sigma_min ({e.sigma_min}) must be below method.edm.sigma_max ({e.sigma_max})",
    )
    c = m.consistency
    _check(
        m.section != "consistency" or c.sigma_min < c.sigma_max,
        f"method.consistency.sigma_min ({c.sigma_min}) must be below method.consistency.sigma_max "
        f"({c.sigma_max})",
    )
    _check(  # flow's few-step sampling grid spans EDM's default range (schedules.ratio_range)
        m.section != "consistency" or c.base != "flow" or (c.sigma_min, c.sigma_max) == (0.002, 80),
        "method.consistency.base='flow' samples between sigma 0.002 and 80: leave "
        "method.consistency.sigma_min and sigma_max at those, or use base='edm'",
    )
    _check(
        m.section != "consistency" or c.target != "ema" or t.ema_halflife_kimg > 0,
        "method.consistency.target='ema' needs the run's EMA: set train.ema_halflife_kimg > 0 "
        "or use target='online'",
    )
    _check(
        m.section != "consistency" or c.start_levels <= c.max_levels,
        f"method.consistency.start_levels ({c.start_levels}) must not exceed max_levels "
        f"({c.max_levels}), where the curriculum ends",
    )
    _check(
        m.section != "consistency" or not c.teacher_guide or bool(c.teacher),
        "method.consistency.teacher_guide guides a teacher's ODE: set method.consistency.teacher "
        "or leave teacher_guide empty",
    )
    return config


def save_json(config: Config, path: Path) -> None:
    from difflab.io import atomic_write_text

    atomic_write_text(path, config.to_json() + "\n")


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A stored config of an earlier version in this version's layout (runs and exports stay
    readable): version 1 kept every method's options side by side in ``method``."""
    if values.get("version") == 1 and isinstance(values.get("method"), dict):
        flat = dict(values["method"])
        method = {key: flat.pop(key) for key in ("name", "stratified") if key in flat}
        for section, cls in _METHOD_CLASSES.items():
            names = {item.name for item in fields(cls)}
            method[section] = {key: flat[key] for key in names & set(flat)}
        values = {**values, "method": method, "version": 2}
    return values


_METHOD_CLASSES = {
    "tutorial": TutorialMethod,
    "ddpm": DDPMMethod,
    "flow": FlowMethod,
    "edm": EDMMethod,
}


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
    values = upgrade(values)
    version = values["version"]
    if version != CONFIG_VERSION:
        raise DifflabError(
            f"{path} was written by an incompatible difflab (config version {version}, "
            f"this one reads {CONFIG_VERSION})"
        )
    return validate(from_dict(values))
