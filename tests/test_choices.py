"""Every value of every setting that offers choices runs end to end: two training steps of the
tiny preset, each logged with its EMA loss, then a preview, on a method (and sampler) that reads
the setting; the consistency options by distilling a tiny teacher, so that the teacher's solver
is read too. A choice that breaks only on a path the focused tests skip fails here: target =
"ema" died at a run's first log line until this file existed."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from conftest import TINY_PRESET, make_images, run_cli

from difflab.limits import limits_of
from difflab.schema import (
    METHOD_SECTIONS,
    MethodConfig,
    SamplerConfig,
    TrainConfig,
    UNetOptions,
)

# each options section and the first method that reads it (ddpm, not ddpm-cosine)
METHODS = {section: method for method, section in reversed(METHOD_SECTIONS.items())}
SAMPLERS = {"variance": ("ddpm", "ancestral")}  # settings only one sampler reads, and its method
COMPILING = {"compile_mode", "compile_layout"}  # read only by torch.compile (test_devices.py)


def _choices() -> list[tuple[str, str, str]]:
    sections = [("network.unet", UNetOptions), ("sampler", SamplerConfig)]
    sections += [("train", TrainConfig)]
    sections += [(f"method.{name}", type(getattr(MethodConfig(), name))) for name in METHODS]
    return [
        (prefix, field.name, value)
        for prefix, cls in sections
        for field in dataclasses.fields(cls)
        if field.name not in COMPILING
        for value in limits_of(cls, field.name).choices
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("choices")
    preset = root / "tiny.toml"
    preset.write_text(TINY_PRESET)
    images = make_images(root / "images", 12)
    return {"root": root, "preset": preset, "images": images}


@pytest.fixture(scope="module")
def teacher(folders) -> Path:
    from difflab.cli import main

    run_dir = folders["root"] / "teacher"
    args = ["train", "--preset", folders["preset"], "--data", folders["images"], "--out", run_dir]
    assert main([str(a) for a in [*args, "--steps", 2, "--no-progress"]]) == 0
    return run_dir


@pytest.mark.parametrize(("prefix", "name", "value"), _choices())
def test_every_choice_trains_logs_and_previews(prefix, name, value, folders, teacher, capsys):
    section = prefix.removeprefix("method.")
    method, sampler = SAMPLERS.get(name, (METHODS.get(section, "edm"), ""))
    run_dir = folders["root"] / f"{prefix}.{name}={value}"
    # 2 steps of 8 images, a preview after the second (at 16 images, in 4 sampling steps), a
    # log line after each
    common = ["--out", run_dir, "--steps", 2, "--no-progress", "--set", "train.log_every=1"]
    common += ["--set", "train.sample_every_kimg=0.016", "--set", "sampler.steps=4"]
    common += ["--set", f"{prefix}.{name}={value!r}"]
    if method == "consistency":
        # a student on another base than its teacher's has weights of its own
        args = ["distill", teacher, *common, *(["--from-scratch"] if name == "base" else [])]
    else:
        args = ["train", "--preset", folders["preset"], "--data", folders["images"], *common]
        args += ["--method", method, *(["--sampler", sampler] if sampler else [])]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(math.isfinite(line["loss"]) and math.isfinite(line["ema_loss"]) for line in lines)
    assert any(run_dir.glob("pictures/samples-*.png")), sorted(run_dir.rglob("*.png"))
