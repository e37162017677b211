"""Shared test setup: synthetic image folders and a tiny preset, one torch thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # the tests' tensors are tiny; more threads only contend

TINY_PRESET = """
description = "tiny test preset"
[data]
source = "cifar10"
image_size = 8
hflip = true
[network]
name = "unet"
[network.unet]
channels = 8
channel_mult = [1, 2]
num_blocks = 1
attention_resolutions = [4]
dropout = 0.1
[method]
name = "edm"
[sampler]
steps = 4
[train]
batch_size = 8
steps = 6
lr = 2e-3
warmup_steps = 2
ema_halflife_kimg = 0.5
checkpoint_every = 3
sample_every_kimg = 0.024
log_every = 2
num_preview = 4
"""


def make_images(folder: Path, count: int, size: int = 8, seed: int = 0, classes=("cars", "ships")):
    """Class folders of simple structured images: a bright square on a dark background."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(count):
            image = np.full((size, size, 3), 30 + 40 * c, dtype=np.uint8)
            x, y = rng.integers(0, size // 2, 2)
            image[y : y + size // 2, x : x + size // 2] = rng.integers(150, 255, 3)
            path = folder / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``difflab ARGS`` in-process: (exit code, stdout, stderr)."""
    from difflab.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images", 12)


@pytest.fixture
def tiny_preset(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_PRESET)
    return path


@pytest.fixture
def teacher(tmp_path, tiny_preset, image_folder, capsys) -> Path:
    """A 4-step run of the tiny preset (EDM; checkpoints at steps 3 and 4): a teacher to distil."""
    run_dir = tmp_path / "teacher"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    code, _, err = run_cli(capsys, *args, "--steps", 4, "--no-progress")
    assert code == 0, err
    return run_dir


@pytest.fixture
def checkpointed(tmp_path, tiny_preset, image_folder, capsys) -> Path:
    """A run of the tiny preset with checkpoints at steps 3 and 6 (pictures off)."""
    from difflab.train.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    args += ["--no-progress", "--set", "train.sample_every_kimg=0", "--steps", 6]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003", "step-00000006"]
    return run_dir
