from __future__ import annotations

import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cifar import build_fake_cifar10, patch_torchvision_cifar10, serve_folder
from PIL import Image, ImageFile

from difflab.data import default_cache_dir, image_files, load_images, to_model_range
from difflab.errors import DifflabError


def _write(path: Path, value: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "P") else (value,) * len(mode)).save(path)
    return path


def _noise(path: Path, size: int = 64, seed: int = 0) -> bytes:
    """Write a noise image (JPEG or PNG by suffix) and return its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def _image_names(folder: Path) -> list[str]:
    return [p.name for p in image_files(folder)]


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    for i in range(3):
        _write(root / "cat" / f"c{i}.png", 10)
    for i in range(2):
        _write(root / "dog" / f"d{i}.jpg", 200)
    return root


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    root = tmp_path / "flat"
    for i in range(4):
        _write(root / f"{i}.png", 60 * i)
    return root


def test_class_folder_loads_all_classes(class_folder: Path) -> None:
    result = load_images(str(class_folder))
    assert result.images.shape == (5, 3, 32, 32)
    assert result.images.dtype == torch.uint8
    assert result.labels.dtype == torch.int64
    assert result.class_names == ["cat", "dog"]
    assert result.labels.tolist() == [0, 0, 0, 1, 1]
    assert (result.images[:3] == 10).all()
    assert abs(result.images[3:].float().mean().item() - 200) < 2  # JPEG
    assert str(class_folder) in result.source


@pytest.mark.parametrize("choice", ["dog", "DOG", 1, "1"])
def test_class_selection_by_name_or_index(class_folder: Path, choice: str | int) -> None:
    result = load_images(str(class_folder), choice)
    assert result.images.shape == (2, 3, 32, 32)
    assert result.labels.tolist() == [1, 1]
    assert result.class_names == ["cat", "dog"]
    assert "dog" in result.source


@pytest.mark.parametrize("choice", ["horse", 2, "-1"])
def test_unknown_class_lists_known_classes(class_folder: Path, choice: str | int) -> None:
    with pytest.raises(DifflabError) as error:
        load_images(str(class_folder), choice)
    message = str(error.value)
    assert "\n" not in message
    assert "0=cat" in message
    assert "1=dog" in message


def test_only_selected_class_is_decoded(class_folder: Path) -> None:
    (class_folder / "cat" / "broken.png").write_bytes(b"not an image")
    result = load_images(str(class_folder), "dog")
    assert len(result) == 2


def test_flat_folder(flat_folder: Path) -> None:
    result = load_images(str(flat_folder))
    assert result.images.shape == (4, 3, 32, 32)
    assert result.class_names == []
    assert result.labels.tolist() == [0, 0, 0, 0]
    assert result.images[:, 0, 0, 0].tolist() == [0, 60, 120, 180]


def test_class_on_flat_folder_is_an_error(flat_folder: Path) -> None:
    with pytest.raises(DifflabError, match=r"flat folder.*drop --class"):
        load_images(str(flat_folder), "automobile")


def test_default_class_on_flat_folder_is_ignored(
    flat_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="difflab"):
        result = load_images(str(flat_folder), "automobile", class_is_default=True)
    assert len(result) == 4
    assert "default class" in caplog.text
    assert "automobile" in caplog.text


def test_unreadable_files_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    good = [_write(root / f"good{i}.png", 100) for i in range(3)]
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    for name in ("truncated.jpg", "truncated.png"):
        data = _noise(root / name)
        (root / name).write_bytes(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with caplog.at_level(logging.WARNING, logger="difflab"):
        result = load_images(str(root))
    assert len(result) == len(good)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 3 unreadable images" in message
    for name in ("corrupt.jpg", "truncated.jpg", "truncated.png"):
        assert name in message


def test_folder_of_only_corrupt_files(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DifflabError, match="could be read"):
        load_images(str(tmp_path))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    (tmp_path / "empty_subfolder").mkdir()
    with pytest.raises(DifflabError, match="no image files"):
        load_images(str(tmp_path))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DifflabError, match="does not exist"):
        load_images(str(tmp_path / "nowhere"))


def test_bad_image_size(flat_folder: Path) -> None:
    with pytest.raises(DifflabError, match="image size"):
        load_images(str(flat_folder), image_size=0)


def test_modes_and_sizes_become_rgb_squares(tmp_path: Path) -> None:
    _write(tmp_path / "gray.png", 50, mode="L")
    _write(tmp_path / "alpha.png", 90, mode="RGBA")
    _write(tmp_path / "palette.gif", 3, mode="P")
    _write(tmp_path / "cmyk.tif", 0, mode="CMYK")
    _write(tmp_path / "wide.bmp", 120, size=(40, 50))
    _noise(tmp_path / "big.JPEG", size=300)
    result = load_images(str(tmp_path))
    assert result.images.shape == (6, 3, 32, 32)
    gray = result.images[_image_names(tmp_path).index("gray.png")]
    assert (gray == 50).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    shown = np.zeros((32, 32, 3), dtype=np.uint8)
    shown[:16] = 255  # top half white as displayed
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_images(str(tmp_path)).images[0].float()
    assert image[:, :12].mean() > 240
    assert image[:, 20:].mean() < 15


def test_image_size_resizes_and_crops(tmp_path: Path) -> None:
    pixels = np.zeros((50, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255  # left half black, right half white
    Image.fromarray(pixels).save(tmp_path / "halves.png")
    result = load_images(str(tmp_path), image_size=16)
    image = result.images[0]
    assert image.shape == (3, 16, 16)
    assert image[:, :, 0].max() == 0
    assert image[:, :, -1].min() == 255


def test_image_files_sorted_and_filtered(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", ".hidden.png", "notes.txt", "c.webp"]:
        (tmp_path / name).write_bytes(b"")
    assert _image_names(tmp_path) == ["a.jpg", "b.PNG", "c.webp"]


def test_to_model_range() -> None:
    images = torch.tensor([0, 255, 128], dtype=torch.uint8)
    out = to_model_range(images)
    assert out.dtype == torch.float32
    assert out[0].item() == -1.0
    assert out[1].item() == 1.0
    assert abs(out[2].item()) < 0.01


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DIFFLAB_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "difflab"


def test_cifar10_download_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = build_fake_cifar10(tmp_path / "server", per_class_per_batch=2)
    cache = tmp_path / "cache"
    with serve_folder(fake.archive.parent) as base_url:
        patch_torchvision_cifar10(monkeypatch, fake, f"{base_url}/{fake.archive.name}")
        result = load_images("CIFAR10", "automobile", cache_dir=cache)
    expected = fake.train_images[fake.train_labels == 1]
    assert result.class_names[1] == "automobile"
    assert result.images.shape == (10, 3, 32, 32)
    assert result.labels.tolist() == [1] * 10
    assert torch.equal(result.images, torch.from_numpy(expected).permute(0, 3, 1, 2))
    assert (cache / "cifar-10-batches-py" / "data_batch_5").is_file()
    everything = load_images("cifar10", cache_dir=cache, image_size=16)  # cached: no server
    assert everything.images.shape == (100, 3, 16, 16)
    assert everything.labels.tolist() == fake.train_labels.tolist()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("failure", ["missing file", "connection refused"])
def test_cifar10_download_failure_points_at_a_local_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, failure: str
) -> None:
    fake = build_fake_cifar10(tmp_path / "server")
    cache = tmp_path / "cache"
    with serve_folder(tmp_path / "server") as base_url:
        if failure == "connection refused":
            base_url = f"http://127.0.0.1:{_closed_port()}"
        patch_torchvision_cifar10(monkeypatch, fake, f"{base_url}/missing.tar.gz")
        with pytest.raises(DifflabError) as error:
            load_images("cifar10", "automobile", cache_dir=cache)
    message = str(error.value)
    assert "\n" not in message
    assert f"could not download CIFAR-10 into {cache}" in message
    assert "give a local image folder instead of cifar10" in message
