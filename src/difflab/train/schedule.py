"""Rates and decays as pure functions of progress (nanoGPT's ``get_lr``, EDM's EMA half-life)."""

from __future__ import annotations

import math

from difflab.config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based); independent of the run's length."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "rounds":
        # The tutorial: after every round, lr = max(min_lr, lr * decay).
        return max(train.min_lr, train.lr * train.round_decay ** (step // train.round_steps))
    if train.lr_schedule == "cosine":
        progress = min(step - train.warmup_steps, train.cosine_steps) / train.cosine_steps
        return train.min_lr + (train.lr - train.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return train.lr


def ema_beta(batch_images: int, images_seen: int, train: TrainConfig) -> float:
    """Per-step EMA decay from a half-life counted in images (Karras et al. 2022, training_loop).

    The half-life is at most ``ema_rampup`` times the images seen so far, so a short run averages
    over its recent past instead of its random initialisation.
    """
    halflife = train.ema_halflife_kimg * 1000
    if train.ema_rampup > 0:
        halflife = min(halflife, images_seen * train.ema_rampup)
    return 0.5 ** (batch_images / max(halflife, 1e-8))
