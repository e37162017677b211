"""Training images in memory: CIFAR-10 (torchvision download) or a local image folder."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.datasets import CIFAR10
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from difflab.errors import DifflabError, brief
from difflab.io import is_run

log = logging.getLogger("difflab")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
_FOLDER_HINT = "give a folder of images (class subfolders or a flat folder of images)"
_NAMES_IN_MESSAGE = 5
_CLASSES_IN_MESSAGE = 30
_SERIAL_BELOW = 64
_BAR_FROM = 5000  # images: loading this many shows a progress bar (CIFAR-10: 50,000)
SAMPLES_MANIFEST = "samples.json"  # written by difflab sample: which files are the samples
SAMPLE_NAME = re.compile(r"\d{5,}\.png")  # a sample's file: 00000.png (save_images)
SAMPLE_PICTURES = ("grid.png", "strip.png", "reverse-process.gif")  # beside them: not samples
#: Pixels (width x height, from the file's header) above which an image is not decoded: 64
#: megapixels, below PIL's own decompression-bomb warning (89 MP). A 140 KB PNG can claim
#: 12000 x 12000 and decode to 430 MB.
MAX_PIXELS = 64_000_000
UNREADABLE = "unreadable image{s}"
TOO_LARGE = f"image{{s}} over {MAX_PIXELS // 10**6} megapixels"


@dataclass
class ImageSet:
    """Images held in memory, loaded once."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N], index into class_names (zeros for a flat folder)
    class_names: list[str]  # [] for a flat folder
    source: str  # human-readable description

    def __len__(self) -> int:
        return int(self.images.shape[0])


def default_cache_dir() -> Path:
    """Where downloads go: $DIFFLAB_CACHE if set, else ~/.cache/difflab."""
    env = os.environ.get("DIFFLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difflab"


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels 0..255 to float32 -1..1."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 images, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def image_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files directly in `folder` (or anywhere below it), sorted; hidden ones left out.

    An image name that is not a readable file (a dangling link, a link loop) is listed too, so
    that decoding reports it by name instead of it vanishing.
    """
    root = Path(folder)
    if not recursive:
        with os.scandir(root) as entries:
            names = [e.name for e in entries if _is_image_name(e.name) and not _is_dir(e)]
        return sorted(root / name for name in names)
    found: list[Path] = []
    for dirpath, filenames in _walk(root):
        found.extend(Path(dirpath) / name for name in filenames if _is_image_name(name))
    return sorted(found)


def _walk(root: Path) -> Iterator[tuple[str, list[str]]]:
    """``os.walk`` following links, each real folder once (a link loop is walked once), hidden
    folders left out; unreadable folders are skipped."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            info = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        yield dirpath, filenames


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop
        return False


def load_images(
    source: str,
    class_name: str | int | None = None,
    image_size: int = 32,
    *,
    class_is_default: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageSet:
    """Load all images of `source` (or of one class) as one uint8 [N, 3, S, S] tensor.

    `source` is "cifar10" (downloaded by torchvision into `cache_dir`) or a folder path: either
    class subfolders of images (torchvision ImageFolder layout) or a flat folder of images.
    `class_name` is a class name or an index into the class names. `class_is_default` marks a
    class that came from a preset: a flat folder then ignores it instead of failing.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DifflabError(
            f"image size must be a positive integer, got {image_size!r}; use e.g. 32"
        )
    if source.strip().lower() == "cifar10":
        return _load_cifar10(class_name, image_size, cache_dir)
    return _load_folder(Path(source).expanduser(), class_name, image_size, class_is_default)


def _load_cifar10(
    class_name: str | int | None, image_size: int, cache_dir: str | Path | None
) -> ImageSet:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dataset = _download_cifar10(root)
    names = list(dataset.classes)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    description = "CIFAR-10 train"
    if class_name is not None:
        index = _class_index(class_name, names, "CIFAR-10")
        keep = labels == index
        images, labels = images[keep], labels[keep]
        description += f", class {names[index]}"
    images = fit_size(images.contiguous(), image_size)
    return ImageSet(images, labels, names, f"{description} ({len(labels)} images)")


def _download_cifar10(root: Path) -> CIFAR10:
    try:
        return CIFAR10(root=root, train=True, download=True)
    except Exception as error:  # network, disk, checksum and archive errors all end here
        reason = brief(error)
        raise DifflabError(
            f"could not download CIFAR-10 into {root} ({reason}); give a local image folder "
            "instead of cifar10 (class subfolders or a flat folder of images)"
        ) from error


def _load_folder(
    folder: Path, class_name: str | int | None, image_size: int, class_is_default: bool
) -> ImageSet:
    if not folder.exists():
        raise DifflabError(
            f"data path {folder} does not exist; {_FOLDER_HINT}, or cifar10 for CIFAR-10"
        )
    if not folder.is_dir():
        raise DifflabError(f"data path {folder} is not a folder; {_FOLDER_HINT}")
    names = _class_names(folder)
    if names:
        return _load_class_folders(folder, names, class_name, image_size)
    files = _listed_samples(folder) or image_files(folder)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DifflabError(f"no image files ({extensions}) in {folder}; {_FOLDER_HINT}")
    if class_name is not None:
        if not class_is_default:
            raise DifflabError(
                f"{folder} is a flat folder of images with no classes; drop --class (data.class_name)"
            )
        log.warning(
            "ignored the preset's default class %r: %s is a flat folder of images with no "
            "classes, so all its images are used",
            class_name,
            folder,
        )
    images, _ = _decode_files(files, image_size, folder)
    labels = torch.zeros(len(images), dtype=torch.int64)
    return ImageSet(images, labels, [], f"folder {folder} ({len(images)} images)")


def _listed_samples(folder: Path) -> list[Path] | None:
    """The images a ``samples.json`` (written by ``difflab sample``) lists, so that the grid,
    strip and GIF beside them are not taken for samples; None without a readable list."""
    manifest = folder / SAMPLES_MANIFEST
    if not manifest.is_file():
        return None
    try:
        names = json.loads(manifest.read_text())["images"]
        files = [folder / Path(name).name for name in names]
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignored %s (%s): reading every image in %s", manifest, brief(error), folder)
        return None
    listed = set(files)
    others = [path.name for path in foreign_images(folder) if path not in listed]
    if others and not run_pictures(folder):  # which hold training's pictures
        # a data folder that a sample went into: neither part alone is the data
        raise DifflabError(
            f"{folder} holds difflab samples ({SAMPLES_MANIFEST}) and {len(others)} other "
            f"images ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): move the "
            "samples to a folder of their own"
        )
    return files


def run_pictures(folder: Path) -> bool:
    """Whether ``folder`` is a run's ``pictures/`` (links and ``..`` followed)."""
    folder = folder.resolve()
    return folder.name == "pictures" and is_run(folder.parent)


def foreign_images(folder: Path) -> list[Path]:
    """Images directly in ``folder`` that ``difflab sample`` does not write (00000.png, ... and
    its pictures): a sign that the folder holds data."""
    return [
        path
        for path in image_files(folder)
        if not SAMPLE_NAME.fullmatch(path.name) and path.name not in SAMPLE_PICTURES
    ]


def _load_class_folders(
    folder: Path, names: list[str], class_name: str | int | None, image_size: int
) -> ImageSet:
    loose = len(image_files(folder))
    if loose:
        log.warning("ignored %d images directly in %s: it has class subfolders", loose, folder)
    if class_name is None:
        chosen = list(range(len(names)))
        description = f"folder {folder}"
    else:
        chosen = [_class_index(class_name, names, str(folder))]
        description = f"folder {folder}, class {names[chosen[0]]}"
    per_class = [image_files(folder / names[index], recursive=True) for index in chosen]
    files = [path for class_files in per_class for path in class_files]
    file_labels = torch.tensor(
        [index for index, class_files in zip(chosen, per_class, strict=True) for _ in class_files],
        dtype=torch.int64,
    )
    images, kept = _decode_files(files, image_size, folder)
    labels = file_labels[torch.as_tensor(kept, dtype=torch.int64)]
    return ImageSet(images, labels, names, f"{description} ({len(images)} images)")


def _class_names(folder: Path) -> list[str]:
    """Sorted names of the subfolders that hold images (hidden and image-less ones left out)."""
    with os.scandir(folder) as entries:
        subfolders = [e.name for e in entries if _is_dir(e) and not e.name.startswith(".")]
    return sorted(name for name in subfolders if _contains_image(folder / name))


def _class_index(class_name: str | int, names: list[str], where: str) -> int:
    if isinstance(class_name, str):
        if class_name in names:
            return names.index(class_name)
        folded = [name.casefold() for name in names]
        if folded.count(class_name.casefold()) == 1:
            return folded.index(class_name.casefold())
    text = str(class_name).strip()
    if not isinstance(class_name, bool) and text.isdigit() and int(text) < len(names):
        return int(text)
    known = ", ".join(f"{i}={name}" for i, name in enumerate(names[:_CLASSES_IN_MESSAGE]))
    if len(names) > _CLASSES_IN_MESSAGE:
        known += f", ... ({len(names) - _CLASSES_IN_MESSAGE} more)"
    raise DifflabError(f"unknown class {class_name!r} in {where}; pass --class as one of: {known}")


def _decode_files(files: list[Path], size: int, folder: Path) -> tuple[torch.Tensor, list[int]]:
    """Decode `files` to uint8 [N, 3, size, size]; also return the indices of the files kept."""
    _check_memory(len(files), size, folder)
    arrays = _decode_many(files, size)
    kept = [i for i, array in enumerate(arrays) if isinstance(array, np.ndarray)]
    if not kept:
        raise DifflabError(
            f"none of the {len(files)} image files in {folder} could be read "
            f"(e.g. {files[0].relative_to(folder).as_posix()}); replace the broken files or "
            f"{_FOLDER_HINT}"
        )
    for reason in (UNREADABLE, TOO_LARGE):
        skipped = [
            f for f, a in zip(files, arrays, strict=True) if isinstance(a, str) and a == reason
        ]
        if skipped:
            _warn_skipped([f.relative_to(folder).as_posix() for f in skipped], reason)
    stacked = np.stack([arrays[i] for i in kept])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(), kept


def _check_memory(count: int, size: int, folder: Path) -> None:
    """The decoded set lives in memory as uint8: refuse up front what cannot fit."""
    need = count * 3 * size * size
    available = _available_memory()
    if available is not None and need > 0.8 * available:
        raise DifflabError(
            f"{count} images at {size}x{size} need {need / 2**30:.1f} GiB in memory and this "
            f"machine has {available / 2**30:.1f} GiB available; use a smaller --image-size or "
            f"fewer images than {folder} holds"
        )


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _decode_many(files: list[Path], size: int) -> list[np.ndarray | str]:
    """Decode in threads over contiguous chunks (PIL releases the GIL while decoding).

    PIL's own warnings about a file (a decompression bomb, an odd palette) stay inside: a
    bomb is skipped as too large, with difflab's warning, and nothing else needs saying.
    """
    workers = min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if len(files) < _SERIAL_BELOW or workers == 1:
            return [_decode(path, size) for path in files]
        step = -(-len(files) // (16 * workers))
        chunks = [files[i : i + step] for i in range(0, len(files), step)]
        quiet = len(files) < _BAR_FROM or not log.isEnabledFor(logging.INFO)  # -q, other ranks
        hidden = True if quiet else None  # None: shown on a terminal only
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(
                total=len(files), desc="loading images", unit="img", disable=hidden, leave=False
            ) as bar,
        ):
            arrays: list[np.ndarray | str] = []
            for chunk in pool.map(lambda chunk: [_decode(path, size) for path in chunk], chunks):
                arrays.extend(chunk)
                bar.update(len(chunk))
            return arrays


def _warn_skipped(names: list[str], reason: str) -> None:
    shown = ", ".join(names[:_NAMES_IN_MESSAGE])
    if len(names) > _NAMES_IN_MESSAGE:
        shown += ", ..."
    what = reason.format(s="" if len(names) == 1 else "s")
    log.warning("skipped %d %s: %s", len(names), what, shown)


def _decode(path: Path, size: int) -> np.ndarray | str:
    """One file as uint8 [size, size, 3], or why not (``UNREADABLE``, ``TOO_LARGE``)."""
    if not path.is_file():  # a pipe or a device: opening one can wait for ever
        return UNREADABLE
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:  # from the header, before decoding
                return TOO_LARGE
            image.draft(None, (size, size))  # JPEG: decode large files at a reduced scale
            image.load()  # raises on truncated data while ImageFile.LOAD_TRUNCATED_IMAGES is False
            if "exif" in image.info:
                ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return TOO_LARGE
    except Exception:  # any failure on the file's bytes makes it unreadable, not fatal
        return UNREADABLE
    return np.asarray(_fit_pil(rgb, size))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent pixels become white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _fit_pil(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    resized = TF.resize(image, [size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [size, size])


def fit_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images resized (bilinear, antialiased) and centre-cropped to ``size`` x ``size``."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    resized = TF.resize(images, [size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(resized, [size, size]).contiguous()


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _contains_image(folder: Path) -> bool:
    return any(any(map(_is_image_name, filenames)) for _, filenames in _walk(folder))
