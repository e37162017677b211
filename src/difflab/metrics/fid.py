"""FID and KID on Inception pool3 features, plus reference statistics on disk.

* FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (NeurIPS): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
* KID: Binkowski et al. 2018, "Demystifying MMD GANs" (ICLR): unbiased MMD^2 with the cubic
  polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

scipy is imported lazily so that ``import difflab.metrics`` works without the metrics extra.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from difflab.errors import DifflabError
from difflab.io import atomic_write

FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format_version", "mu", "sigma", "num_images", "meta")
_CHUNK = 4096
_EXTRA_MSG = (
    "FID/KID need the metrics extra: pip install 'difflab[metrics]' "
    "(or pass --inception PATH to a weights file)"
)


@dataclass
class FeatureStats:
    """Reference statistics of a data set in feature space."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    features: np.ndarray | None  # float32 [N, D], kept so KID can be computed
    num_images: int
    meta: dict[str, str] = field(default_factory=dict)  # e.g. source, class, extractor hash

    @property
    def image_size(self) -> int | None:
        """The size its images were loaded at (``difflab ref`` records it), or None."""
        size = self.meta.get("image_size", "")
        return int(size) if size.isdecimal() else None


def _feature_matrix(features: Any, name: str, min_rows: int = 2) -> np.ndarray:
    """Check a finite 2-D [N, D] array with at least ``min_rows`` rows."""
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise DifflabError(f"{name} must be a 2-D array [N, D], got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise DifflabError(
            f"{name} has {arr.shape[0]} images, need at least {min_rows}; use more images"
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise DifflabError(f"{name} contains NaN/inf or non-numbers; check the generated images")
    return arr


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1, as np.cov), accumulated in float64 by chunks."""
    n, d = x.shape
    mu = np.zeros(d)
    for start in range(0, n, _CHUNK):
        mu += x[start : start + _CHUNK].sum(axis=0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((d, d))
    for start in range(0, n, _CHUNK):
        centred = x[start : start + _CHUNK].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def feature_stats(
    features: np.ndarray, keep_features: bool = True, meta: dict[str, Any] | None = None
) -> FeatureStats:
    """Mean and covariance (float64) of features [N, D]; optionally keep them as float32 for KID."""
    feats = _feature_matrix(features, "features")
    mu, sigma = _mean_cov(feats)
    kept = feats.astype(np.float32) if keep_features else None
    meta_str = {str(k): str(v) for k, v in (meta or {}).items()}
    return FeatureStats(mu, sigma, kept, int(feats.shape[0]), meta_str)


def _sqrtm(mat: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm, imported lazily; a missing scipy names the metrics extra."""
    try:
        from scipy import linalg
    except ImportError as exc:
        raise DifflabError(_EXTRA_MSG) from exc
    return np.asarray(linalg.sqrtm(mat))


def _check_gaussian(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and sigma [D, D] as float64, finite."""
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.asarray(sigma, np.float64)
    d = mu.shape[0]
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise DifflabError(f"{name}: mu {mu.shape} and sigma {sigma.shape} must be [D] and [D, D]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DifflabError(f"{name}: mu/sigma contain NaN or inf; recompute the statistics")
    return mu, sigma


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017).

    Follows the reference implementation: if sqrtm(S1 S2) is not finite (near-singular product),
    retry with eps * I added to both covariances; tiny imaginary parts from numerical error are
    discarded, large ones raise.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise DifflabError(
            f"feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); "
            "compute both statistics with the same feature extractor"
        )
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = float(np.abs(covmean.imag).max())
            raise DifflabError(
                f"FID: matrix square root has a large imaginary part ({worst:.3g}); "
                "the covariances are degenerate, use more images"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size samples x and y (diagonals of Kxx, Kyy excluded)."""
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kid(
    features1: np.ndarray,
    features2: np.ndarray,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): (mean, std) of unbiased MMD^2.

    Each of ``num_subsets`` rounds draws min(subset_size, n1, n2) rows without replacement from
    each side; the kernel is evaluated in float64.
    """
    f1 = _feature_matrix(features1, "KID features1")
    f2 = _feature_matrix(features2, "KID features2")
    if f1.shape[1] != f2.shape[1]:
        raise DifflabError(
            f"KID feature dimensions differ ({f1.shape[1]} vs {f2.shape[1]}); "
            "use the same feature extractor for both sets"
        )
    if subset_size < 2 or num_subsets < 1:
        raise DifflabError(
            f"KID needs subset_size >= 2 and num_subsets >= 1, got {subset_size}, {num_subsets}"
        )
    m = min(subset_size, f1.shape[0], f2.shape[0])
    rng = np.random.default_rng(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)].astype(np.float64)
        y = f2[rng.choice(f2.shape[0], m, replace=False)].astype(np.float64)
        mmds[i] = _mmd2_unbiased(x, y)
    return float(mmds.mean()), float(mmds.std())


def save_stats(stats: FeatureStats, path: str | Path) -> Path:
    """Write statistics to an .npz (with a format version), atomically via temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "format_version": np.asarray(FORMAT_VERSION),
        "mu": np.asarray(stats.mu, np.float64),
        "sigma": np.asarray(stats.sigma, np.float64),
        "num_images": np.asarray(int(stats.num_images)),
        "meta": np.asarray(json.dumps({str(k): str(v) for k, v in stats.meta.items()})),
    }
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a handle: np.savez would append ".npz" to a name
            np.savez(handle, **arrays)

    atomic_write(path, write)
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file (no pickles); anything else raises a DifflabError."""
    bad = f"{path} is not a valid .npz statistics file; recompute the reference statistics"
    try:
        with open(path, "rb") as handle:  # closed whatever numpy raises
            data = np.load(handle, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DifflabError(bad)
            with data:
                return {key: data[key] for key in data.files}
    except DifflabError:
        raise
    except Exception as exc:  # a damaged zip raises many types (zlib, struct, zipfile, numpy)
        raise DifflabError(bad) from exc


def _parse_stats(arrays: dict[str, np.ndarray], path: Path) -> FeatureStats:
    """Build FeatureStats from the arrays of a version-checked file."""
    missing = [key for key in _REQUIRED_KEYS if key not in arrays]
    if missing:
        raise DifflabError(
            f"{path} lacks keys {missing}; it is not difflab statistics, recompute them"
        )
    version = arrays["format_version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise DifflabError(
            f"{path} has statistics format version {version}, expected {FORMAT_VERSION}; "
            "recompute the reference statistics with this difflab version"
        )
    try:
        features = arrays.get("features")
        return FeatureStats(
            mu=arrays["mu"].astype(np.float64),
            sigma=arrays["sigma"].astype(np.float64),
            features=None if features is None else features.astype(np.float32),
            num_images=int(arrays["num_images"]),
            meta={str(k): str(v) for k, v in json.loads(str(arrays["meta"][()])).items()},
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DifflabError(f"{path} has malformed entries; recompute the statistics") from exc


def _validate_stats(stats: FeatureStats, expected_dim: int, path: Path) -> None:
    """Shapes match ``expected_dim`` and every array is finite."""
    d = expected_dim
    shapes = {"mu": (stats.mu, (d,)), "sigma": (stats.sigma, (d, d))}
    if stats.features is not None:
        shapes["features"] = (stats.features, (stats.features.shape[0], d))
    for key, (arr, shape) in shapes.items():
        if arr.shape != shape:
            raise DifflabError(
                f"{path}: {key} has shape {arr.shape}, expected {shape} (feature dimension {d}); "
                "recompute the statistics with the same feature extractor"
            )
        if not np.isfinite(arr).all():
            raise DifflabError(f"{path}: {key} contains NaN or inf; recompute the statistics")


def load_stats(path: str | Path, expected_dim: int = 2048) -> FeatureStats:
    """Read statistics written by :func:`save_stats`; every problem is a one-line DifflabError."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(
            f"statistics file not found: {path}; compute the reference statistics first"
        )
    stats = _parse_stats(_read_npz(path), path)
    _validate_stats(stats, expected_dim, path)
    return stats


def fid_kid(
    gen_features: np.ndarray,
    ref: FeatureStats,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float | int]:
    """FID and KID of generated features [N, D] against reference statistics."""
    if ref.features is None:
        raise DifflabError(
            "reference statistics have no stored features, so KID cannot be computed; "
            "recompute the reference statistics with features kept"
        )
    gen = feature_stats(gen_features, keep_features=False)
    fid = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    kid_mean, kid_std = kid(gen_features, ref.features, subset_size, num_subsets, seed)
    return {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_gen": gen.num_images,
        "num_ref": ref.num_images,
    }
