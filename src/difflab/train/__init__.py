"""Training: ``difflab.train.train(config, run_dir)`` trains a run, or resumes it with
``resume=True``, as ``difflab train`` does (``Trainer`` for a step at a time)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difflab.train.loop import TrainResult, train
    from difflab.train.trainer import Trainer

__all__ = ["TrainResult", "Trainer", "train"]
_HOMES = {"train": "difflab.train.loop", "TrainResult": "difflab.train.loop",
          "Trainer": "difflab.train.trainer"}  # fmt: skip


def __getattr__(name: str) -> object:  # imported on first use, as difflab's own names are
    if name not in _HOMES:
        raise AttributeError(f"module 'difflab.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
