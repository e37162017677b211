"""Rates and decays as pure functions of progress (nanoGPT's ``get_lr``, EDM's EMA half-life)."""

from __future__ import annotations

import dataclasses
import math

from difflab.config import Config, TrainConfig


def planned_steps(train: TrainConfig) -> int:
    """The optimizer steps a run is planned for: ``train.steps``, else the steps ``train.images``
    takes, else 0 (a ``--time-limit`` run: ``Loop`` fixes it after its first steps)."""
    if train.steps:
        return train.steps
    return math.ceil(train.images / train.batch_size) if train.images else 0


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    "cooldown" is warm-up, stable, decay (Hägele et al. 2024, "Scaling laws and compute-optimal
    training beyond fixed training durations"): the rate holds until the last ``train.cooldown``
    of the planned steps, then falls linearly to ``min_lr`` at the end. It is the only schedule
    that depends on the run's length; before that length is known it is in its stable phase.
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "rounds":
        # The tutorial: after every round, lr = max(min_lr, lr * decay).
        return max(train.min_lr, train.lr * train.round_decay ** (step // train.round_steps))
    if train.lr_schedule == "cosine":
        progress = min(step - train.warmup_steps, train.cosine_steps) / train.cosine_steps
        return train.min_lr + (train.lr - train.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if train.lr_schedule == "cooldown" and (total := planned_steps(train)):
        start = cooldown_start(train)
        if start < total and step >= start:
            return train.min_lr + (train.lr - train.min_lr) * max(total - step, 0) / (total - start)
    return train.lr


def first_changed_rate(before: TrainConfig, after: TrainConfig, steps: int) -> int | None:
    """The first of optimizer steps ``0 .. steps - 1`` whose learning rate differs between the two
    configs, or None: a resumed run is the run its new config describes only if there is none
    (a longer run with "cooldown" that had started cooling down re-warms; a constant rate
    that turns into "cooldown" while still stable is a warm-up-stable-decay branch)."""
    return next((s for s in range(steps) if lr_at(s, before) != lr_at(s, after)), None)


def can_lengthen(train: TrainConfig, step: int) -> bool:
    """Whether a run that took ``step`` steps may be planned longer: no rate it used changes
    (a "cooldown" run that has used a cooled rate may not)."""
    longer = dataclasses.replace(train, steps=planned_steps(train) + 1, images=0)
    return first_changed_rate(train, longer, step) is None


def cooldown_start(train: TrainConfig) -> int:
    """The first step whose rate the run's length changes (the end of the stable phase)."""
    total = planned_steps(train)
    return total - round(train.cooldown * total)


def guide_step(config: Config) -> int:
    """The step whose EMA weights guide the run's sampler (``sampler.guide_at`` of its planned
    steps, at least 1; autoguidance, Karras et al. 2024), or 0: none, or a length not known
    yet."""
    total = planned_steps(config.train)
    if not (config.sampler.guide_at and total):
        return 0
    return max(round(config.sampler.guide_at * total), 1)


def ema_beta(batch_images: int, images_seen: int, train: TrainConfig) -> float:
    """Per-step EMA decay from a half-life counted in images (Karras et al. 2022, training_loop).

    The half-life is at most ``ema_rampup`` times the images seen so far, so a short run averages
    over its recent past instead of its random initialisation.
    """
    halflife = train.ema_halflife_kimg * 1000
    if train.ema_rampup > 0:
        halflife = min(halflife, images_seen * train.ema_rampup)
    return 0.5 ** (batch_images / max(halflife, 1e-8))
