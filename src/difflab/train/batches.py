"""Which training images each optimizer step sees: a pure function of (seed, step)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.config import Config
from difflab.seeds import derive_seed


def batch_indices(step: int, num_images: int, config: Config) -> Tensor:
    """Indices of the global batch of optimizer step ``step`` (a pure function of step).

    Drawn on the host, so the data order is the same on every device.
    """
    t = config.train
    if t.batching == "random":  # the TF notebook: draws with replacement
        gen = torch.Generator().manual_seed(derive_seed(t.seed, "batch", step))
        return torch.randint(num_images, (t.batch_size,), generator=gen)
    # The PyTorch notebook: shuffled passes, the last batch of a pass smaller.
    per_epoch = math.ceil(num_images / t.batch_size)
    epoch, position = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(derive_seed(t.seed, "epoch", epoch))
    order = torch.randperm(num_images, generator=gen)
    return order[position * t.batch_size : (position + 1) * t.batch_size]


def images_before(step: int, num_images: int, config: Config) -> int:
    """Training images seen after ``step`` optimizer steps."""
    t = config.train
    if t.batching == "random":
        return step * t.batch_size
    per_epoch = math.ceil(num_images / t.batch_size)
    epochs, position = divmod(step, per_epoch)
    return epochs * num_images + min(position * t.batch_size, num_images)
