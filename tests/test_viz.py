from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.errors import DifflabError
from difflab.viz import (
    log_ticks,
    plot_lines,
    plot_loss,
    save_gif,
    save_grid,
    save_images,
    save_strip,
    to_uint8,
)


def _images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=generator) * 2 - 1


def _no_temporary_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") for p in folder.iterdir())


def test_to_uint8_clips_instead_of_stretching() -> None:
    images = torch.tensor([[[[1.5, -3.0, 0.0, 1.0, -1.0]]]])
    assert to_uint8(images).flatten().tolist() == [255, 0, 128, 255, 0]
    assert to_uint8(images[0]).shape == (1, 1, 5)
    assert to_uint8(torch.full((3, 2, 2), 0.5)).unique().tolist() == [191]


def test_to_uint8_keeps_uint8() -> None:
    images = torch.arange(6, dtype=torch.uint8).reshape(1, 1, 2, 3)
    assert torch.equal(to_uint8(images), images)


def test_save_grid_size_and_pixels(tmp_path: Path) -> None:
    path = save_grid(_images(6), tmp_path / "sub" / "grid.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (3 * 34 + 2, 2 * 34 + 2)  # 3 per row, padding 2
    assert _no_temporary_files(path.parent)


def test_save_grid_nrow_and_one_channel(tmp_path: Path) -> None:
    path = save_grid(_images(4, channels=1, size=8), tmp_path / "grid.png", nrow=4)
    with Image.open(path) as image:
        assert image.size == (4 * 10 + 2, 10 + 2)


def test_save_grid_exact_pixels(tmp_path: Path) -> None:
    images = torch.stack([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), -1.0)])
    path = save_grid(images, tmp_path / "pair.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (8, 14, 3)
    assert (pixels[2:6, 2:6] == 255).all()
    assert (pixels[2:6, 8:12] == 0).all()
    assert (pixels[0] == 0).all()


def test_save_images_names_and_native_size(tmp_path: Path) -> None:
    images = _images(3, size=16)
    paths = save_images(images, tmp_path / "samples", start_index=7)
    assert [p.name for p in paths] == ["00007.png", "00008.png", "00009.png"]
    with Image.open(paths[1]) as image:
        assert image.size == (16, 16)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), to_uint8(images[1]).permute(1, 2, 0).numpy())
    assert save_images(images[:1], tmp_path / "samples")[0].name == "00000.png"


@pytest.mark.parametrize("labels", [None, ["t=999", "t=500", "t=0"]])
def test_save_strip(tmp_path: Path, labels: list[str] | None) -> None:
    path = save_strip(_images(3), tmp_path / "strip.png", labels=labels)
    with Image.open(path) as image:
        width, height = image.size
    assert width == (3 * 34 + 2) * 4  # 32 px frames enlarged 4x
    if labels is None:
        assert height == 36 * 4
    else:
        assert height > 36 * 4


def test_save_strip_label_count_must_match(tmp_path: Path) -> None:
    with pytest.raises(DifflabError, match="labels"):
        save_strip(_images(3), tmp_path / "strip.png", labels=["a"])


def test_save_gif_frames(tmp_path: Path) -> None:
    path = save_gif(_images(5, size=8), tmp_path / "gif" / "denoise.gif", duration_ms=50)
    with Image.open(path) as image:
        assert image.format == "GIF"
        assert image.n_frames == 5
        assert image.size == (32, 32)
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
    assert durations[0] == 50
    assert durations[-1] > durations[0]


def test_save_gif_of_grids(tmp_path: Path) -> None:
    frames = torch.stack([_images(4, size=8, seed=s) for s in range(3)])
    path = save_gif(frames, tmp_path / "grids.gif", scale=1)
    with Image.open(path) as image:
        assert image.n_frames == 3
        assert image.size == (2 * 10 + 2, 2 * 10 + 2)


def test_a_gif_of_a_big_grid_is_enlarged_less(tmp_path: Path) -> None:
    """Four times a 5x5 grid of 32-pixel images, 101 frames, was 5-18 MB of GIF."""
    frames = torch.stack([_images(25, size=32, seed=s) for s in range(2)])
    with Image.open(save_gif(frames, tmp_path / "big.gif")) as image:
        assert image.size == (2 * (5 * 34 + 2), 2 * (5 * 34 + 2))  # 2x: at most 512 pixels
    with Image.open(save_gif(frames[:, 0], tmp_path / "one.gif")) as image:
        assert image.size == (128, 128)  # one image: 4x


def test_plot_lines(tmp_path: Path) -> None:
    series = {"fid": ([1, 2, 3], [30.0, 20.0, 15.0]), "kid": ([1, 2, 3], [0.1, 0.05, 0.02])}
    path = plot_lines(
        series,
        tmp_path / "plots" / "lines.png",
        xlabel="epoch",
        ylabel="score",
        logy=True,
        logx=True,
    )
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100
    assert _no_temporary_files(path.parent)


def test_log_ticks_drop_values_whose_labels_would_overlap() -> None:
    assert log_ticks([18, 5, 35, 9, 17, 10, 5, 0]) == [5, 9, 10, 17, 35]


@pytest.mark.parametrize("smoothing", [0, 1, 10, 500])
def test_plot_loss(tmp_path: Path, smoothing: int) -> None:
    steps = list(range(200))
    losses = (torch.linspace(1.0, 0.1, 200) + 0.05 * torch.rand(200)).tolist()
    path = plot_loss(steps, losses, tmp_path / "loss.png", smoothing=smoothing)
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_plot_loss_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(DifflabError, match="steps"):
        plot_loss([1, 2], [1.0], tmp_path / "loss.png")
