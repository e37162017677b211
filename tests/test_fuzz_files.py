"""Fuzzing every kind of file difflab reads, damaged at random.

Images, presets, checkpoints (state.pt and the weights), exported weights and reference
statistics: each starts as a good file written by difflab (or PIL), then gets truncated, has
bytes overwritten, or gets random bytes appended, by Hypothesis. Reading it must either work
or raise one DifflabError line; an image that cannot be read is skipped by name and the good
images still load; no library warning escapes.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PRESET, make_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difflab.api import load_run
from difflab.cli import main
from difflab.config import load_preset
from difflab.data import load_images
from difflab.errors import DifflabError
from difflab.metrics.fid import FeatureStats, load_stats, save_stats
from difflab.train.checkpoint import list_checkpoints, load_checkpoint

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def damage(draw, size: int) -> list[tuple[str, int, bytes]]:
    """One to three edits of a file of ``size`` bytes: cut, overwrite or append."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cut", "overwrite", "append"]))
        position = draw(st.integers(0, max(size - 1, 0)))
        data = draw(st.binary(min_size=1, max_size=64))
        edits.append((kind, position, data))
    return edits


def apply(path: Path, edits: list[tuple[str, int, bytes]]) -> None:
    data = bytearray(path.read_bytes())
    for kind, position, chunk in edits:
        position = min(position, len(data))
        if kind == "cut":
            del data[position:]
        elif kind == "overwrite":
            data[position : position + len(chunk)] = chunk
        else:
            data += chunk
    path.write_bytes(bytes(data))


def reads_or_refuses(read) -> object | None:
    """``read()``'s value, or None after a one-line DifflabError; no warning may escape."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = read()
        except DifflabError as error:
            assert "\n" not in str(error)
            value = None
    assert not caught, [str(w.message) for w in caught]
    return value


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """One good file of each kind, written once."""
    root = tmp_path_factory.mktemp("originals")
    (root / "tiny.toml").write_text(TINY_PRESET)
    images = make_images(root / "images", 4)
    run = root / "run"
    argv = ["-q", "train", "--preset", root / "tiny.toml", "--data", images, "--out", run]
    assert main([str(a) for a in [*argv, "--steps", 3, "--no-progress"]]) == 0
    assert main(["-q", "export", str(run), "--out", str(root / "model.safetensors")]) == 0
    features = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    stats = FeatureStats(features.mean(0), np.cov(features, rowvar=False), features, 20, {})
    save_stats(stats, root / "ref.npz")
    return {
        "png": images / "cars" / "000.png",
        "jpg": _jpeg(images / "cars" / "001.png", root / "car.jpg"),
        "preset": root / "tiny.toml",
        "run": run,
        "export": root / "model.safetensors",
        "ref": root / "ref.npz",
    }


def _jpeg(source: Path, target: Path) -> Path:
    from PIL import Image

    Image.open(source).convert("RGB").resize((32, 32)).save(target, quality=90)
    return target


def _copy(original: Path, folder: Path) -> Path:
    target = folder / original.name
    if original.is_dir():
        shutil.copytree(original, target)
    else:
        shutil.copy(original, target)
    return target


@pytest.mark.parametrize("kind", ["png", "jpg"])
@FUZZ
@given(data=st.data())
def test_a_damaged_image_is_skipped_by_name_and_the_others_load(originals, tmp_path, kind, data):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    good = _copy(originals["png"], folder).rename(folder / "good.png")
    bad = _copy(originals[kind], folder)
    apply(bad, data.draw(damage(bad.stat().st_size)))
    images = reads_or_refuses(lambda: load_images(str(folder), None, 8))
    assert images is not None and len(images) in (1, 2) and good.exists()


@FUZZ
@given(data=st.data())
def test_a_damaged_preset_loads_or_is_one_line(originals, tmp_path, data):
    path = _copy(originals["preset"], tmp_path)
    apply(path, data.draw(damage(path.stat().st_size)))
    reads_or_refuses(lambda: load_preset(str(path)))


@pytest.mark.parametrize("file", ["state.pt", "net.safetensors", "ema.safetensors"])
@FUZZ
@given(data=st.data())
def test_a_damaged_checkpoint_loads_or_is_one_line(originals, tmp_path, file, data):
    run = Path(tempfile.mkdtemp(dir=tmp_path)) / "run"
    shutil.copytree(originals["run"], run)
    target = list_checkpoints(run)[-1] / file
    apply(target, data.draw(damage(target.stat().st_size)))
    reads_or_refuses(lambda: load_checkpoint(target.parent))
    reads_or_refuses(lambda: load_run(run, device="cpu"))


@FUZZ
@given(data=st.data())
def test_damaged_exported_weights_load_or_are_one_line(originals, tmp_path, data):
    path = _copy(originals["export"], tmp_path)
    apply(path, data.draw(damage(path.stat().st_size)))
    reads_or_refuses(lambda: load_run(path, device="cpu"))


@FUZZ
@given(data=st.data())
def test_damaged_reference_statistics_load_or_are_one_line(originals, tmp_path, data):
    path = _copy(originals["ref"], tmp_path)
    apply(path, data.draw(damage(path.stat().st_size)))
    reads_or_refuses(lambda: load_stats(path, expected_dim=8))
