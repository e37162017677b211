"""Seeds derived from a run's seed: independent streams for each purpose and each image, so an
image or a batch of data depends on its own index only, never on the batch size or the device."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values; independent streams for (seed, purpose, index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def image_seeds(seed: int, start: int, count: int) -> list[int]:
    """Seed of image i: a function of (seed, i) only, so images do not depend on the batch size."""
    return [derive_seed(seed, "image", i) for i in range(start, start + count)]
