"""Fuzzing every config key and every numeric command-line option from their declarations.

The values are generated from each field's type and declared ``Limits`` (``difflab.limits``),
not from a hand-written list: inside the range, on its edges, just outside, NaN, infinity and the
wrong type. A value inside the range is accepted (or refused for its relation to another
setting, naming the key); a value outside is refused with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
from conftest import TINY_PRESET
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from difflab.cli import build_parser
from difflab.config import Config, SamplerConfig, apply_overrides, from_dict, validate
from difflab.errors import DifflabError
from difflab.limits import Bounded, Limits

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BASE = from_dict(tomllib.loads(TINY_PRESET))


def _fields(cls: type, prefix: str = "") -> list[tuple[str, type, Limits | None]]:
    """(key, type, limits) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            found += _fields(hint, f"{prefix}{item.name}.")
        else:
            found.append((f"{prefix}{item.name}", hint, item.metadata.get("limits")))
    return found


FIELDS = _fields(Config)
DECLARED = [(key, hint, limits) for key, hint, limits in FIELDS if limits is not None]
# Keys whose valid values also depend on another setting; an error about them names the key.
RELATED = {
    "train.batch_size": "train.accumulation",
    "train.accumulation": "train.batch_size",
    "method.ddpm.beta_start": "method.ddpm.beta_start",
    "method.ddpm.beta_end": "method.ddpm.beta_start",
    "method.edm.sigma_min": "method.edm.sigma_min",
    "method.edm.sigma_max": "method.edm.sigma_min",
    "train.steps": "train.steps",
    "train.eval_every_kimg": "train.eval_every_kimg",
    "version": "config version",
}


def test_every_number_and_choice_setting_declares_its_limits():
    """A new numeric or closed-choice setting without a declared range fails here."""
    undeclared = [
        key
        for key, hint, limits in FIELDS
        if limits is None and hint in (int, float, list[int], list[float]) and key != "version"
    ]
    assert undeclared == [], undeclared
    assert len(DECLARED) >= 60


def _item_type(hint: type) -> type:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint


def inside(hint: type, limits: Limits) -> st.SearchStrategy:
    """Values the declaration allows: its choices, or numbers within (and on) its bounds."""
    if limits.choices:
        return st.sampled_from(limits.choices)
    kind = _item_type(hint)
    low = -1e6 if limits.low is None else limits.low
    high = 1e6 if limits.high is None or math.isinf(limits.high) else limits.high
    if kind is int:
        low, high = math.ceil(low + limits.low_open), math.floor(high - limits.high_open)
        one = st.integers(int(low), int(high))
    else:
        one = st.floats(
            low, high, exclude_min=limits.low_open, exclude_max=limits.high_open, allow_nan=False
        )
    if typing.get_origin(hint) is list:
        size = limits.length or 3
        return st.lists(one, min_size=size if limits.length else 1, max_size=size)
    return one


def outside(hint: type, limits: Limits) -> st.SearchStrategy:
    """Values the declaration refuses: past either bound, NaN, infinity, another type."""
    kind = _item_type(hint)
    is_list = typing.get_origin(hint) is list
    wrong = st.sampled_from(["'text'", "{}", *([] if is_list else ["[]"])])
    wrong = wrong if kind is not str else st.nothing()
    if is_list and limits.min_length:
        wrong |= st.just("[]")
    if limits.choices:
        return st.text(min_size=1, max_size=8).filter(lambda v: v not in limits.choices).map(repr)
    bad: list[float] = [math.nan]
    if limits.finite:
        bad += [math.inf, -math.inf]
    if limits.low is not None:
        bad += [limits.low - (1 if kind is int else 1e-3)] + ([limits.low] * limits.low_open)
    if limits.high is not None and math.isfinite(limits.high):
        bad += [limits.high + 1] + ([limits.high] * limits.high_open)
    if kind is int:
        bad = [v for v in bad if math.isfinite(v)]
        bad = [int(v) for v in bad]
    literal = st.sampled_from(bad).map(_toml)
    if typing.get_origin(hint) is list:
        literal = literal.map(lambda v: f"[{v}]")
    return literal | wrong


def _toml(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _literal(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return _toml(value)


@st.composite
def setting_values(draw) -> tuple[str, str, bool]:
    key, hint, limits = draw(st.sampled_from(DECLARED))
    if draw(st.booleans()):
        return key, _literal(draw(inside(hint, limits))), True
    return key, draw(outside(hint, limits)), False


@FUZZ
@given(setting_values())
@example(("train.grad_clip", "-1", False))
@example(("train.ema_halflife_kimg", "nan", False))
@example(("train.keep_last", "0", False))
@example(("sampler.steps", "1000000000", False))
@example(("method.flow.p_std", "-1", False))
def test_every_setting_is_checked_against_its_declared_range(case):
    key, text, allowed = case
    # Only the chosen method's options are read and checked: choose the method the key is for.
    section = key.split(".")[1] if key.startswith("method.") and key.count(".") == 2 else None
    chosen = [f"method.name={section!r}"] if section else []
    try:
        validate(apply_overrides(BASE, [*chosen, f"{key}={text}"]))
    except DifflabError as error:
        message = str(error)
        assert "\n" not in message
        if allowed:  # refused only for how it relates to another setting
            assert RELATED.get(key, key) in message, (key, text, message)
        else:
            assert key in message, (key, text, message)
        return
    assert allowed, f"{key}={text} was accepted"


# --------------------------------------------------------------------------- the command line


def _bounded_options() -> list[tuple[str, str, Bounded]]:
    """(command, flag, type) of every numeric option of every command."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    return [
        (name, action.option_strings[-1], action.type)
        for name, command in commands.items()
        for action in command._actions
        if isinstance(action.type, Bounded)
    ]


OPTIONS = _bounded_options()


def test_every_numeric_option_is_bounded():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    plain = [
        f"{name} {action.option_strings[-1]}"
        for name, command in commands.items()
        for action in command._actions
        if action.type in (int, float)
    ]
    assert plain == [], plain
    flags = {(command, flag) for command, flag, _ in OPTIONS}
    assert {("sample", "--steps"), ("sample", "--seed"), ("train", "--time-limit")} <= flags
    assert len(OPTIONS) >= 18


@st.composite
def option_values(draw) -> tuple[str, str, Bounded, str, bool]:
    command, flag, kind = draw(st.sampled_from(OPTIONS))
    hint = int if kind.kind is int else float
    if draw(st.booleans()):
        return command, flag, kind, _literal(draw(inside(hint, kind.limits))), True
    bad = draw(outside(hint, kind.limits) | st.sampled_from(["", "x", "1e999999", "--"]))
    return command, flag, kind, bad.strip("'"), False


@FUZZ
@given(option_values())
@example(("sample", "--steps", Bounded.like(SamplerConfig, "steps", low=1), "-1", False))
def test_every_numeric_option_parses_or_names_itself(case):
    command, flag, kind, text, allowed = case
    try:
        value = kind(text)
    except Exception as error:  # argparse turns this into a one-line DifflabError
        assert not allowed, (command, flag, text, error)
        assert "must be" in str(error) and "\n" not in str(error)
        return
    assert allowed or kind.limits.allows(value), (command, flag, text)


@pytest.mark.parametrize(
    ("command", "flag", "kind"), OPTIONS, ids=[f"{c}{f}" for c, f, _ in OPTIONS]
)
def test_an_out_of_range_option_is_one_line_naming_the_flag(command, flag, kind):
    below = (kind.limits.low or 0) - 1
    argv = [command, "RUN", "--out", "o.npz", flag, str(below)]
    if command == "train":
        argv = [command, flag, str(below)]
    if command == "eval":
        argv = [command, "RUN", "--ref", "REF.npz", flag, str(below)]
    with pytest.raises(DifflabError) as caught:
        build_parser().parse_args(argv)
    assert f"argument {flag}: must be" in str(caught.value) and "\n" not in str(caught.value)


def test_only_the_chosen_methods_options_are_checked():
    """Another method's options are not read, so they cannot stop a run (issue 15)."""
    validate(apply_overrides(BASE, ["method.name='edm'", "method.flow.p_std=-1"]))
    with pytest.raises(DifflabError, match=re.escape("method.flow.p_std must be a number > 0")):
        validate(apply_overrides(BASE, ["method.name='flow'", "method.flow.p_std=-1"]))


def test_a_setting_that_moved_into_its_methods_section_says_where():
    with pytest.raises(DifflabError, match=re.escape("it is method.ddpm.prediction now")):
        apply_overrides(BASE, ["method.prediction='v'"])
    with pytest.raises(DifflabError, match=re.escape("it is method.flow.time_distribution now")):
        from_dict({"method": {"name": "flow", "time_distribution": "uniform"}})
