"""Bad settings, images and reference statistics: refused or skipped with one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from reliability import (
    assert_one_line_error,
    random_bytes,
    train_args,
    truncate,
)

from difflab.errors import DifflabError
from difflab.metrics.fid import FeatureStats, load_stats, save_stats

# --------------------------------------------------------------------------- settings

BAD_SETTINGS = [
    ("method.edm.p_mean=nan", "method.edm.p_mean must be a finite number, got nan"),
    ("method.edm.p_std=inf", "method.edm.p_std must be a number > 0, got inf"),
    ("sampler.s_noise=nan", "sampler.s_noise must be a number >= 0, got nan"),
    ("sampler.s_churn=-1", "sampler.s_churn must be a number >= 0, got -1.0"),
    ("train.device='meta'", "unknown device 'meta'"),
    ("train.betas=" + "[" * 3000, "train.betas: expected a list"),
]


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_settings_that_would_train_into_nan_are_refused_first(
    tmp_path, tiny_preset, image_folder, capsys, setting, message
):
    args = train_args(tiny_preset, image_folder, tmp_path / "run", "--set", setting)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- data


def test_corrupt_and_truncated_images_are_named_and_skipped(
    tmp_path, tiny_preset, image_folder, capsys
):
    good = image_folder / "cars" / "000.png"
    (image_folder / "cars" / "truncated.png").write_bytes(good.read_bytes()[:40])
    (image_folder / "cars" / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    (image_folder / "ships" / "empty.png").write_bytes(b"")
    args = train_args(tiny_preset, image_folder, tmp_path / "run", "--steps", 1)
    code, _out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "skipped 3 unreadable images" in err
    for name in ("cars/truncated.png", "cars/noise.jpg", "ships/empty.png"):
        assert name in err
    assert "24 images" in err


def test_a_data_set_smaller_than_the_batch_trains_with_a_warning(tmp_path, tiny_preset, capsys):
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(folder / f"{i}.png")
    args = train_args(tiny_preset, folder, tmp_path / "run", "--steps", 2)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "to step 2" in out, err
    assert "smaller than the batch (8)" in err


def _mixed_images(folder: Path) -> int:
    """One image per PIL mode, size and format that a user folder may hold."""
    folder.mkdir()
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    images = {
        "rgb-wide.png": rgb,
        "tall.jpg": rgb.resize((5, 40)),
        "one-pixel.png": Image.new("RGB", (1, 1), (9, 9, 9)),
        "gray.png": rgb.convert("L"),
        "gray-alpha.png": rgb.convert("LA"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.gif": rgb.convert("P"),
        "bilevel.bmp": rgb.convert("1"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "int32.tiff": rgb.convert("I"),
        "float.tiff": rgb.convert("F"),
        "big.webp": rgb.resize((300, 200)),
    }
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    images["palette-transparent.png"] = palette
    sixteen = Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16))
    images["sixteen-bit.png"] = sixteen
    for name, image in images.items():
        image.save(folder / name)
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    return len(images) + 1


def test_mixed_sizes_and_modes_all_load_and_train(tmp_path, tiny_preset, capsys):
    count = _mixed_images(tmp_path / "mixed")
    args = train_args(tiny_preset, tmp_path / "mixed", tmp_path / "run", "--steps", 2)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "to step 2" in out, err
    assert f"({count} images)" in err and "unreadable" not in err, err


# --------------------------------------------------------------------------- reference statistics


def _stats(dim: int = 8) -> FeatureStats:
    features = np.random.default_rng(3).normal(size=(20, dim)).astype(np.float32)
    mu, sigma = features.mean(0).astype(np.float64), np.cov(features, rowvar=False)
    return FeatureStats(mu, sigma, features, 20, {"source": "test"})


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _valid_arrays(dim: int = 8) -> dict:
    s = _stats(dim)
    return {
        "format_version": np.asarray(1),
        "mu": s.mu,
        "sigma": s.sigma,
        "num_images": np.asarray(20),
        "meta": np.asarray('{"source": "test"}'),
    }


STATS_FAULTS = {
    "random-bytes": (lambda p: random_bytes(p), "not a valid .npz"),
    "truncated": (lambda p: (save_stats(_stats(), p), truncate(p)), "not a valid .npz"),
    "not-stats": (lambda p: _npz(p, images=np.zeros(3)), "lacks keys"),
    "future-version": (
        lambda p: _npz(p, **{**_valid_arrays(), "format_version": np.asarray(9)}),
        "format version",
    ),
    "pickled-object": (
        lambda p: _npz(p, **{**_valid_arrays(), "mu": np.array([{}], dtype=object)}),
        "not a valid .npz",
    ),
    "meta-not-json": (
        lambda p: _npz(p, **{**_valid_arrays(), "meta": np.asarray("{oops")}),
        "malformed",
    ),
    "nan-mean": (
        lambda p: _npz(p, **{**_valid_arrays(), "mu": np.full(8, np.nan)}),
        "NaN",
    ),
    "dimension-mismatch": (lambda p: save_stats(_stats(dim=16), p), "feature dimension 8"),
    "missing-file": (lambda p: None, "not found"),
}


@pytest.mark.parametrize("fault", list(STATS_FAULTS))
def test_bad_reference_statistics_are_one_clear_error(tmp_path, fault):
    make, message = STATS_FAULTS[fault]
    path = tmp_path / "ref.npz"
    make(path)
    with pytest.raises(DifflabError, match=message) as error:
        load_stats(path, expected_dim=8)
    assert "\n" not in str(error.value)


def test_good_reference_statistics_round_trip(tmp_path):
    stats = load_stats(save_stats(_stats(), tmp_path / "ref.npz"), expected_dim=8)
    assert stats.num_images == 20 and stats.features.shape == (20, 8)
