"""Pictures as files: image grids, single PNGs, denoising strips, GIFs and line plots.

Images come in the model range, float [-1, 1]. Plots use matplotlib's Agg canvas directly
(no pyplot, nothing is ever shown). Every file is written under a temporary name in its
folder and then renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from difflab.errors import DifflabError
from difflab.io import atomic_write, check_output_file

_PADDING = 2
_STRIP_FRAME_PX = 128
_GIF_HOLD_MS = 1500
_GIF_FRAME_PX = 512  # the default enlargement's limit
_LABEL_MARGIN_PX = 4


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (any shape) -> uint8 0..255, clipping values outside the range.

    uint8 input is returned unchanged (on the CPU).
    """
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    pixels = torch.nan_to_num(images.detach().float().cpu(), nan=0.0)
    return ((pixels.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save [N, C, H, W] images as one PNG grid, `nrow` images per row (default ceil(sqrt(N))):
    float images in [-1, 1] (clipped; the range ``Run.sample`` gives), or uint8 as they are."""
    path = check_output_file(Path(path), "path", (".png",), "the grid")
    return _save_image(_grid(images, nrow), path, "PNG")


def save_images(images: torch.Tensor, folder: str | Path, start_index: int = 0) -> list[Path]:
    """Save each of [N, C, H, W] images as its own PNG, named 00000.png, 00001.png, ..."""
    folder = Path(folder)
    pixels = to_uint8(_as_batch(images))
    return [
        _save_image(_to_pil(image), folder / f"{start_index + i:05d}.png", "PNG")
        for i, image in enumerate(pixels)
    ]


def save_strip(frames: torch.Tensor, path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Save [F, C, H, W] frames side by side in one PNG, enlarged, with optional labels below."""
    path = check_output_file(Path(path), "path", (".png",), "the strip")
    frames = _as_batch(frames)
    if labels is not None and len(labels) != frames.shape[0]:
        raise DifflabError(f"got {len(labels)} labels for {frames.shape[0]} frames")
    scale = max(1, _STRIP_FRAME_PX // frames.shape[-2])
    strip = _enlarge(_grid(frames, nrow=frames.shape[0]), scale)
    if labels:
        strip = _add_labels(strip, labels, frame_width=frames.shape[-1], scale=scale)
    return _save_image(strip, path, "PNG")


def save_gif(
    frames: torch.Tensor,
    path: str | Path,
    duration_ms: int = 120,
    scale: int | None = None,
    nrow: int | None = None,
) -> Path:
    """Save [F, C, H, W] frames (or [F, N, C, H, W]: a grid of ``nrow`` per row per frame) as a
    looping GIF, enlarged ``scale`` times (by default up to 4 times, the frame at most
    512 pixels: a 100-step GIF of a big grid at 4x is tens of MB).

    Each frame shows for `duration_ms`, the last one longer. Pillow merges identical
    consecutive frames into one with their summed duration.
    """
    path = check_output_file(Path(path), "path", (".gif",), "the GIF")
    if frames.dim() == 5:
        pictures = [_grid(frame, nrow) for frame in frames]
    elif frames.dim() == 4:
        pictures = [_to_pil(frame) for frame in to_uint8(frames)]
    else:
        shape = tuple(frames.shape)
        raise DifflabError(f"save_gif expects [F, C, H, W] or [F, N, C, H, W], got {shape}")
    scale = scale or max(1, min(4, _GIF_FRAME_PX // max(pictures[0].size)))
    pictures = [_enlarge(picture, scale) for picture in pictures]
    durations = [duration_ms] * (len(pictures) - 1) + [max(_GIF_HOLD_MS, duration_ms)]
    options = {"format": "GIF", "save_all": True, "append_images": pictures[1:], "loop": 0}
    return atomic_write(
        path, lambda temporary: pictures[0].save(temporary, duration=durations, **options)
    )


def plot_lines(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    logx: bool = False,
) -> Path:
    """Plot named (x, y) series on one set of axes; the file format follows the suffix (PNG)."""
    figure, axes = _figure()
    for name, (xs, ys) in series.items():
        x, y = _floats(xs), _floats(ys)
        axes.plot(x, y, marker="o" if len(x) < 30 else None, label=name)
    _label_axes(axes, xlabel, ylabel, title, logy)
    if logx:  # ticks at the measured x values, written as plain numbers
        axes.set_xscale("log")
        axes.set_xticks(log_ticks(x for xs, _ in series.values() for x in _floats(xs)))
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
    if series:
        axes.legend()
    return _save_figure(figure, path)


def log_ticks(values: Iterable[float], min_ratio: float = 1.1) -> list[float]:
    """The distinct positive values, ascending, less any within ``min_ratio`` of the last kept
    one (their labels would overlap on a log axis)."""
    kept: list[float] = []
    for value in sorted({v for v in values if v > 0}):
        if not kept or value >= kept[-1] * min_ratio:
            kept.append(value)
    return kept


def plot_loss(
    steps: Sequence[float],
    losses: Sequence[float],
    path: str | Path,
    *,
    smoothing: int = 0,
    xlabel: str = "step",
) -> Path:
    """Plot the raw loss lightly and its moving average over `smoothing` points on top.

    `smoothing=0` picks a window of about 1/50 of the points; 1 draws the raw curve only.
    """
    x, y = _floats(steps), _floats(losses)
    if len(x) != len(y):
        raise DifflabError(f"got {len(x)} steps for {len(y)} losses")
    window = min(smoothing or max(1, len(y) // 50), max(len(y), 1))
    figure, axes = _figure()
    axes.plot(x, y, color="C0", alpha=0.3, linewidth=0.8, label="loss")
    if window > 1:
        average = np.convolve(y, np.ones(window) / window, mode="valid")
        axes.plot(x[window - 1 :], average, color="C0", label=f"moving average of {window}")
    _label_axes(axes, xlabel, "loss", "", logy=False)
    axes.legend()
    return _save_figure(figure, path)


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise DifflabError(f"expected a tensor of images [N, C, H, W], got {type(images).__name__}")
    if images.numel() == 0:
        raise DifflabError(f"no images to save (shape {tuple(images.shape)})")
    if images.dim() == 3:
        return images.unsqueeze(0)
    if images.dim() != 4:
        raise DifflabError(f"expected images [N, C, H, W] or [C, H, W], got {tuple(images.shape)}")
    return images


def _grid(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1):
        raise DifflabError(
            f"nrow must be a positive integer (images per row) or None, got {nrow!r}"
        )
    batch = to_uint8(_as_batch(images))
    per_row = nrow or math.ceil(math.sqrt(batch.shape[0]))
    return _to_pil(make_grid(batch, nrow=per_row, padding=_PADDING))


def _to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] with C = 1 or 3 -> PIL image."""
    channels = image.shape[0]
    if channels not in (1, 3):
        raise DifflabError(f"expected 1 or 3 channels, got {channels}")
    pixels = image.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)


def _enlarge(image: Image.Image, scale: int) -> Image.Image:
    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _add_labels(
    strip: Image.Image, labels: Sequence[str], frame_width: int, scale: int
) -> Image.Image:
    """Write each label centred under its frame, on a band added below the strip."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(strip)
    heights = [probe.textbbox((0, 0), text, font=font)[3] for text in labels]
    band = max(heights, default=0) + 2 * _LABEL_MARGIN_PX
    canvas = Image.new(strip.mode, (strip.width, strip.height + band), 0)
    canvas.paste(strip, (0, 0))
    draw = ImageDraw.Draw(canvas)
    white = 255 if canvas.mode == "L" else (255, 255, 255)
    for i, text in enumerate(labels):
        centre = (_PADDING + i * (frame_width + _PADDING) + frame_width / 2) * scale
        width = draw.textlength(text, font=font)
        draw.text(
            (centre - width / 2, strip.height + _LABEL_MARGIN_PX), text, fill=white, font=font
        )
    return canvas


def _floats(values: Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _figure() -> tuple[Figure, Axes]:
    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.grid(alpha=0.3)
    return figure, axes


def _label_axes(axes: Axes, xlabel: str, ylabel: str, title: str, logy: bool) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    if logy:
        axes.set_yscale("log")
        low, high = axes.get_ylim()
        if high / low < 30:  # a narrow range: plain numbers (70, 100, 200), not 2x10^2
            axes.yaxis.set_major_formatter(ScalarFormatter())
            axes.yaxis.set_minor_formatter(ScalarFormatter())


def _save_figure(figure: Figure, path: str | Path) -> Path:
    figure.tight_layout()
    file_format = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format=file_format))


def _save_image(image: Image.Image, path: str | Path, file_format: str) -> Path:
    return atomic_write(path, lambda temporary: image.save(temporary, format=file_format))
