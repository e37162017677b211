"""Declared ranges: the one place that says which values a setting or an option may take.

A config field declares its range with ``setting(default, low=..., high=...)``; ``validate``
checks every field against it, the command line's numeric options parse through
``Bounded`` types built from the same declarations, and the fuzz tests generate their inputs
from them. Upper bounds keep memory and time bounded by what is asked for: an absurd step or
image count is refused up front, naming the limit.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from typing import Any

from difflab.errors import DifflabError

#: Sampler steps: a grid of this many float64 times is 80 KB; DDPM's own has 1,000.
MAX_SAMPLER_STEPS = 10_000
#: Images in one ``sample`` or ``eval`` call: FID protocols use 50,000; the features of this
#: many take 1.6 GB.
MAX_IMAGES = 100_000
MAX_BATCH = 16_384
#: Images sampled at once: the CPU U-Net needs a few MB per image, the paper one about 16 MB.
MAX_SAMPLE_BATCH = 1024
MAX_STEPS = 10**12


@dataclass(frozen=True)
class Limits:
    """Allowed values: numbers in [low, high] (ends excluded when ``*_open``), or ``choices``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True  # inf refused even without a bound (NaN always is)
    choices: tuple[str, ...] = ()
    length: int | None = None  # lists: exactly this many items
    min_length: int = 0  # lists: at least this many items
    integer: bool = False  # only for the wording: "an integer" rather than "a number"

    def describe(self) -> str:
        """E.g. "an integer in [1, 10000]", "a number > 0", "one of fp32, bf16"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        noun = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{noun} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {_num(self.high)}"
        return f"a finite {noun[2:]}" if self.finite else noun

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True  # types are checked where values are parsed
        if math.isnan(value) or (self.finite and math.isinf(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, value: Any, name: str) -> None:
        """A one-line DifflabError naming ``name`` and the value when ``value`` is not allowed."""
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                raise DifflabError(f"{name} must be a list of {self.length}, got {value!r}")
            if len(value) < self.min_length:
                raise DifflabError(
                    f"{name} must be a list of at least {self.min_length}, got {value!r}"
                )
            for item in value:
                self.check(item, name)
            return
        if not self.allows(value):
            what = f"{self.describe()} (each item)" if self.length else self.describe()
            raise DifflabError(f"{name} must be {what}, got {value!r}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting(default: Any, **limits: Any) -> Any:
    """A dataclass field with a default and declared ``Limits``."""
    sample = default[0] if isinstance(default, list) and default else default
    integer = isinstance(sample, int) and not isinstance(sample, bool)
    metadata = {"limits": Limits(integer=integer, **limits)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def limits_of(cls: type, name: str) -> Limits:
    """The declared limits of field ``name`` of dataclass ``cls``."""
    return cls.__dataclass_fields__[name].metadata.get("limits", Limits())


class Bounded:
    """An argparse ``type`` that parses an int or float and checks it against ``Limits``."""

    def __init__(self, kind: type, limits: Limits) -> None:
        self.kind, self.limits = kind, replace(limits, integer=kind is int)
        self.__name__ = kind.__name__  # what argparse calls the type in its messages

    @classmethod
    def like(cls, dataclass: type, name: str, **changes: Any) -> Bounded:
        """The option of a config field: its type and limits, with ``changes`` (e.g. low=1)."""
        kind = dataclass.__dataclass_fields__[name].type
        kind = {"int": int, "float": float}.get(kind, kind)
        return cls(kind, replace(limits_of(dataclass, name), **changes))

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not self.limits.allows(value):
            raise argparse.ArgumentTypeError(f"must be {self.limits.describe()}, got {text!r}")
        return value
