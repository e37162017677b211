"""Fuzzing the edges: the config loader, the CLI, and the samplers at extreme settings.

Config and CLI: whatever the input, the only exceptions are ``DifflabError`` (and argparse's
``SystemExit(0)`` for --help), and ``main`` returns an exit code with one-line errors.
Samplers: every compatible (method, sampler) pair gives finite images of the right shape at 1
and 1000 steps, eta 0 and 1, on both grids, with a tiny random network as the denoiser.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRESET
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from difflab.cli import build_parser, main
from difflab.config import (
    Config,
    MethodConfig,
    SamplerConfig,
    TutorialMethod,
    apply_overrides,
    from_dict,
    load_preset,
    parse_value,
    preset_names,
    validate,
)
from difflab.errors import DifflabError
from difflab.plans import SAMPLERS, build_sampler
from difflab.registry import METHODS
from difflab.samplers import SampleNoise
from difflab.seeds import image_seeds

# Derandomized: CI sees the same examples on every run, so a pass or a failure is reproducible.
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _flatten(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        if isinstance(value, dict):
            keys += _flatten(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


KEYS = _flatten(Config().to_dict())
FIELDS = sorted({part for key in KEYS for part in key.split(".")})


# --------------------------------------------------------------------------- values as text


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("-inf" if value < 0 else "inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", "edm", "ddpm", "unet", "cpu", "auto", "random", "[]", "1e999"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
junk_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24
)
value_text = st.one_of(values.map(toml_literal), junk_text)


# --------------------------------------------------------------------------- the config


@FUZZ
@given(junk_text)
@example("[" * 5000)
@example("{a=" * 3000)
@example("1\nx = 2")
@example('"unterminated')
def test_parse_value_never_raises(text):
    parse_value(text)


def _accepts_or_refuses(build) -> Config | None:
    """``build()`` gives a config or a DifflabError; a config then validates or refuses too."""
    try:
        config = build()
    except DifflabError as error:
        assert "\n" not in str(error)
        return None
    try:
        return validate(config)
    except DifflabError as error:
        assert "\n" not in str(error)
        return None


override = st.one_of(
    st.tuples(st.sampled_from(KEYS), value_text).map(lambda kv: f"{kv[0]}={kv[1]}"),
    junk_text,
)


@FUZZ
@given(st.lists(override, max_size=5))
@example(["train.betas=" + "[" * 4000])
@example(["train.device='meta'"])
@example(["method.edm.p_mean=nan"])
@example(["sampler.s_noise=inf"])
def test_apply_overrides_only_raises_difflab_errors(overrides):
    config = _accepts_or_refuses(lambda: apply_overrides(Config(), overrides))
    if config is not None:
        assert config.train.device in ("auto", "cpu", "mps") or config.train.device[:4] == "cuda"


tables = st.recursive(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=4),
    lambda inner: st.dictionaries(st.sampled_from(FIELDS), inner | values, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(tables)
@example({"train": {"lr": math.nan}})
@example({"network": {"unet": []}})
@example({"version": 2})
def test_from_dict_only_raises_difflab_errors(table):
    _accepts_or_refuses(lambda: from_dict(table))


PRESET_LINES = TINY_PRESET.strip().splitlines()


@st.composite
def mutated_presets(draw) -> str:
    """The tiny preset with some values replaced, lines dropped or duplicated, or junk added."""
    lines = []
    for line in PRESET_LINES:
        action = draw(st.sampled_from(["keep"] * 6 + ["value", "drop", "twice", "junk"]))
        if action == "value" and " = " in line:
            line = f"{line.split(' = ')[0]} = {draw(value_text)}"
        if action != "drop":
            lines.append(line)
        if action == "twice":
            lines.append(line)
        if action == "junk":
            lines.append(draw(junk_text))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(mutated_presets() | junk_text)
@example("[train]\nbetas = " + "[" * 5000)
@example("\ufeff[train]")
def test_load_preset_on_random_toml_only_raises_difflab_errors(scratch, text):
    path = scratch / "random.toml"
    path.write_text(text, encoding="utf-8")
    _accepts_or_refuses(lambda: load_preset(str(path)))


# --------------------------------------------------------------------------- the CLI

TRAIN_FLAGS = {
    "--preset": st.sampled_from(preset_names()) | junk_text | st.just("x.toml"),
    "--class": junk_text,
    "--steps": st.sampled_from(["0", "-1", "1", "x", "1e3", "99999999999999999999"]),
    "--images": st.sampled_from(["0", "-5", "7", "nan"]),
    "--time-limit": st.sampled_from(["0", "-1", "nan", "inf", "0.001", "x"]),
    "--batch-size": st.sampled_from(["0", "-1", "3", "x"]),
    "--seed": st.sampled_from(["0", "-1", "2", "x", str(2**80)]),
    "--method": st.sampled_from([*METHODS, "magic", ""]),
    "--network": st.sampled_from(["tutorial", "tutorial-keras", "unet", "resnet"]),
    "--sampler": st.sampled_from([*SAMPLERS, "warp"]),
    "--device": st.sampled_from(["cpu", "cuda", "cuda:3", "meta", "xla", "cuda:x", "", "mps"]),
    "--checkpoint-every": st.sampled_from(["0", "-1", "5", "x"]),
    "--set": st.tuples(st.sampled_from(KEYS), value_text).map(lambda kv: f"{kv[0]}={kv[1]}")
    | junk_text,
    "--resume": junk_text | st.just("."),
    "--init": junk_text,
    "--no-progress": st.none(),
    "-q": st.none(),
    "--bogus": st.none(),
}
EXPORT_FLAGS = {
    "--raw": st.none(),
    "--checkpoint": junk_text,
    "--out": junk_text | st.just("model.safetensors"),
}
SAMPLE_FLAGS = {
    "--num": st.sampled_from(["0", "-2", "3", "x"]),
    "--seed": st.sampled_from(["0", "x"]),
    "--batch-size": st.sampled_from(["0", "2", "x"]),
    "--sampler": st.sampled_from([*SAMPLERS, "warp"]),
    "--steps": st.sampled_from(["0", "-1", "1000", "x"]),
    "--eta": st.sampled_from(["0", "1", "2", "nan", "x"]),
    "--checkpoint": junk_text,
    "--no-ema": st.none(),
    "--device": st.sampled_from(["cpu", "meta", "cuda", "x"]),
}


@st.composite
def argvs(draw, scratch: Path) -> list[str]:
    command = draw(st.sampled_from(["train", "train", "train", "sample", "sample", "export", "?"]))
    flags = {"train": TRAIN_FLAGS, "sample": SAMPLE_FLAGS, "export": EXPORT_FLAGS}.get(command, {})
    argv = [command]
    if command in ("sample", "export"):
        argv.append(draw(junk_text | st.just(str(scratch / "no-run"))))
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=6)) if flags else []:
        value = draw(flags[flag])
        argv += [flag] if value is None else [flag, value]
    if draw(st.sampled_from([False] * 30 + [True])):
        argv.append(draw(st.sampled_from(["-h", "--help"])))
    # Last, so that they win: nothing is written outside scratch and no data set exists.
    argv += ["--out", str(scratch / "out")]
    if command == "train":
        argv += ["--data", str(scratch / "no-data")]
    return argv


def run_main(argv: list[str]) -> tuple[int | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return main(argv), err.getvalue()
        except SystemExit as stop:  # only --help may leave argparse this way
            assert stop.code == 0 and ("-h" in argv or "--help" in argv), argv
            return None, err.getvalue()


@pytest.fixture(scope="module")
def in_scratch(scratch):
    previous = Path.cwd()
    os.chdir(scratch)
    yield scratch
    os.chdir(previous)


@FUZZ
@given(st.data())
def test_parse_args_only_raises_difflab_errors_or_help(in_scratch, data):
    argv = data.draw(argvs(in_scratch))
    try:
        build_parser().parse_args(argv)
    except DifflabError as error:
        assert "\n" not in str(error)
    except SystemExit as stop:
        assert stop.code == 0 and ("-h" in argv or "--help" in argv), argv


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_main_returns_an_exit_code_and_one_line_errors(in_scratch, data):
    argv = data.draw(argvs(in_scratch))
    code, err = run_main(argv)
    if code is None:
        return
    assert isinstance(code, int), argv
    assert "Traceback" not in err and "unexpected" not in err, (argv, err)
    assert all(line.startswith("difflab: ") for line in err.splitlines()), (argv, err)
    assert code != 0, (argv, err)  # no data set exists, so nothing can succeed
    assert err.splitlines()[-1].startswith("difflab: error: "), (argv, err)
    assert not (in_scratch / "out").exists(), argv


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "two\nlines", "--out", "o"],
        ["train", "--resume", "a\rb\nc"],
        ["train", "--data", "x\ny", "--out", "o"],
        ["train", "--set", "train.betas=" + "[" * 5000, "--data", "x", "--out", "o"],
    ],
    ids=["newline-run-dir", "newline-resume", "newline-data", "deep-nesting"],
)
def test_an_error_naming_odd_input_stays_one_line(in_scratch, argv):
    code, err = run_main(argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("difflab: error:") and "unexpected" not in err, err


@pytest.mark.parametrize("device", ["meta", "xla", "cpu:1", "cuda:x", ""])
def test_train_refuses_devices_it_cannot_train_on(in_scratch, device):
    code, err = run_main(["train", "--device", device, "--data", "x", "--out", "o"])
    assert code == 2 and err.startswith("difflab: error: unknown device"), err


# --------------------------------------------------------------------------- samplers


class TinyNet(nn.Module):
    """(x, noise condition, labels) -> tensor like x: a 1x1 convolution plus a time term."""

    def __init__(self, seed: int, zero: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 1)
        self.time = nn.Parameter(torch.randn(3) * 0.1)
        if zero:
            for p in self.parameters():
                nn.init.zeros_(p)

    def forward(self, x, cond, labels=None):
        time = torch.tanh(cond.float())[:, None, None, None] * self.time[None, :, None, None]
        return torch.tanh(self.conv(x)) + time


def _method(name: str, steps: int):
    """The method; the tutorial runs exactly its levels, so ``steps`` sets them."""
    options = {"tutorial": TutorialMethod(num_levels=steps)} if name == "tutorial" else {}
    return METHODS[name](MethodConfig(name=name, **options))


def compatible_pairs() -> list[tuple[str, str]]:
    return [
        (method, sampler)
        for method in METHODS
        for sampler, spec in SAMPLERS.items()
        if spec.requires(_method(method, 16))
    ]


PAIRS = compatible_pairs()
GRIDS = {"tutorial": ["default"]}  # the rho-spaced grid is not defined for the tutorial


def sample(method_name, sampler, steps, *, eta=0.0, grid="default", seed=0, num=2, zero=False):
    method = _method(method_name, steps)
    plan = build_sampler(method, SamplerConfig(name=sampler, steps=steps, eta=eta, grid=grid))
    denoiser = method.denoiser(TinyNet(seed, zero))
    rng = SampleNoise(image_seeds(seed, 0, num))
    noise = rng.randn((3, 4, 4)) * float(method.process.alpha_sigma(plan.grid[:1])[1])
    calls = []
    out = plan(denoiser, noise, rng, on_step=lambda i, x, x0: calls.append(i))
    return out, calls, plan


def _extreme_cases():
    for method, sampler in PAIRS:
        etas = (0.0, 1.0) if sampler == "ddim" else (0.0,)
        grids = GRIDS.get(method, ["default", "edm"])
        for steps, eta, grid in itertools.product((1, 1000), etas, grids):
            name = f"{method}-{sampler}-{steps}-eta{eta:g}-{grid}"
            yield pytest.param(method, sampler, steps, eta, grid, id=name)


def test_every_method_has_a_compatible_sampler():
    assert {method for method, _ in PAIRS} == set(METHODS)
    assert len(PAIRS) >= 14


@pytest.mark.parametrize(("method", "sampler", "steps", "eta", "grid"), list(_extreme_cases()))
def test_samplers_at_extreme_settings_give_finite_images(method, sampler, steps, eta, grid):
    out, calls, plan = sample(method, sampler, steps, eta=eta, grid=grid)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert torch.isfinite(out).all(), (method, sampler, steps)
    assert calls == list(range(plan.num_steps))
    named = SAMPLERS[sampler].grid if grid == "default" else grid
    rho_spaced = named in ("edm", "few-step")
    assert plan.num_steps == steps or (method.startswith("ddpm") and rho_spaced)
    assert 1 <= plan.num_steps <= steps  # DDPM's discrete steps drop duplicates of the grid
    grid_t = plan.grid
    assert torch.isfinite(grid_t).all()
    assert (grid_t[:-1] >= grid_t[1:]).all()  # descending
    assert float(_method(method, steps).process.alpha_sigma(grid_t[-1:])[1]) == 0.0


@settings(FUZZ, max_examples=40)
@given(
    pair=st.sampled_from(PAIRS),
    steps=st.integers(1, 40),
    eta=st.floats(0, 1),
    seed=st.integers(0, 2**31),
    zero=st.booleans(),
    grid=st.sampled_from(["default", "edm"]),
)
def test_samplers_are_finite_and_deterministic_per_image(pair, steps, eta, seed, zero, grid):
    method, sampler = pair
    grid = grid if method != "tutorial" else "default"
    eta = eta if sampler == "ddim" else 0.0  # DDIM's alone: the others refuse one
    out, _, _ = sample(method, sampler, steps, eta=eta, grid=grid, seed=seed, num=3, zero=zero)
    assert out.shape == (3, 3, 4, 4) and torch.isfinite(out).all()
    again, _, _ = sample(method, sampler, steps, eta=eta, grid=grid, seed=seed, num=3, zero=zero)
    assert torch.equal(out, again)  # same seeds, same images, stochastic samplers included
    alone, _, _ = sample(method, sampler, steps, eta=eta, grid=grid, seed=seed, num=1, zero=zero)
    assert torch.allclose(out[:1], alone, rtol=1e-4, atol=1e-4)  # an image ignores its batch


@settings(FUZZ, max_examples=40)
@given(
    method=st.sampled_from([m for m in METHODS if m != "tutorial"]),
    steps=st.integers(1, 1000),
    rho=st.floats(1.0, 20.0),
)
def test_time_grids_descend_to_the_clean_end(method, steps, rho):
    chosen = _method(method, steps)
    rho_spaced = build_sampler(chosen, SamplerConfig(steps=steps, grid="edm", rho=rho)).grid
    assert len(chosen.process.grid(steps)) == steps + 1
    assert 2 <= len(rho_spaced) <= steps + 1
    for grid in (chosen.process.grid(steps), rho_spaced):
        alpha, sigma = chosen.process.alpha_sigma(grid)
        assert (grid[:-1] >= grid[1:]).all()
        assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
        assert float(sigma[-1]) == 0.0 and float(sigma[0]) > 0
        if chosen.process.variance_preserving:
            assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha), atol=1e-6)
