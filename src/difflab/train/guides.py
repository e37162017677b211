"""Autoguidance guides (Karras et al. 2024): a weaker model of the same kind that a sampler
steers away from. A run's own guide is the checkpoint the trainer kept at ``sampler.guide_at``
(``checkpoint.GUIDE_MARK``); an export carries it under ``checkpoint.GUIDE_PREFIX``; any other
run, checkpoint folder or export of the same method, image size and classes may be named.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from torch import nn

from difflab.config import Config
from difflab.errors import DifflabError
from difflab.train.checkpoint import (
    GUIDE_MARK,
    GUIDE_PREFIX,
    LoadedModel,
    checkpoint_step,
    list_checkpoints,
    load_model,
    load_weights_into,
    read_weights,
    split_checkpoint,
    weights_digest,
)
from difflab.train.schedule import guide_step

log = logging.getLogger("difflab")


def load_guide(
    path: str | Path, config: Config, build: Callable[[Config], nn.Module]
) -> LoadedModel:
    """An autoguidance guide for a model of ``config``: the EMA weights of a run directory, one
    of its checkpoint folders, or an export, trained with the same method on images of the same
    size and classes (its network may differ: Karras et al. 2024 guide with a smaller one)."""
    source, checkpoint = split_checkpoint(path)
    try:
        guide = load_model(source, build, checkpoint)
    except DifflabError as error:  # say which of the two models it is
        raise DifflabError(f"the guide: {error}") from None

    def kind(c: Config) -> tuple:
        return c.method, c.data.image_size, c.data.class_names

    if kind(guide.config) != kind(config):
        raise DifflabError(
            f"the guide {path} was trained with another method, image size or classes than "
            "this model; autoguidance needs a weaker model of the same kind (e.g. an earlier "
            "checkpoint folder of the run)"
        )
    return guide


def own_guide(
    run_dir: Path, config: Config, build: Callable[[Config], nn.Module], step: int
) -> nn.Module | None:
    """A run's own guide (``sampler.guide_at``): the EMA weights of the newest guide checkpoint
    the trainer kept before ``step``, the step of the weights to sample; None when the run has
    no guide or has not reached it. An extended run keeps guiding by the guide it has."""
    folder = own_guide_folder(run_dir, config, step=step)
    return None if folder is None else load_model(run_dir, build, folder).net


def own_guide_folder(
    run_dir: Path, config: Config, doing: str = "sampling", step: int | None = None
) -> Path | None:
    """The checkpoint folder of a run's own guide for the weights of ``step`` (by default its
    newest checkpoint's); ``doing`` is what goes on unguided if it is missing, for the warning."""
    checkpoints = list_checkpoints(run_dir) if config.sampler.guide_at else []
    if not checkpoints:
        return None
    step = checkpoint_step(checkpoints[-1]) if step is None else step
    kept = [p for p in checkpoints if (p / GUIDE_MARK).exists() and checkpoint_step(p) < step]
    if not kept:
        if 0 < guide_step(config) < step:
            log.warning("%s has no guide checkpoint: %s without autoguidance", run_dir, doing)
        return None
    return kept[-1]


def carries_guide(path: Path) -> bool:
    """Whether an export carries its run's guide: its key names only, no weights read."""
    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith(GUIDE_PREFIX) for key in handle.keys())  # noqa: SIM118 (not a dict)


def exported_guide(
    path: Path, config: Config, build: Callable[[Config], nn.Module]
) -> nn.Module | None:
    """The run's own guide that an export carries (its ``GUIDE_PREFIX`` keys), or None."""
    n = len(GUIDE_PREFIX)
    weights = {k[n:]: v for k, v in read_weights(path).items() if k.startswith(GUIDE_PREFIX)}
    if not weights:
        return None
    net = build(config)
    load_weights_into(net, weights, path)
    return net


def model_guide(
    path: Path,
    config: Config,
    build: Callable[[Config], nn.Module],
    step: int,
    guide: str | Path | None = None,
) -> nn.Module | None:
    """The guide of the model at ``path``: ``guide`` if named (``load_guide``; an export named as
    its own guide means the guide it carries), else the run's own (``own_guide``) or the one
    its export carries."""
    if guide is not None and not (path.is_file() and Path(guide).resolve() == path.resolve()):
        return load_guide(guide, config, build).net
    if path.is_dir():
        return own_guide(path, config, build, step)
    carried = exported_guide(path, config, build)
    if carried is None and guide is not None:
        raise DifflabError(f"{path} carries no guide to guide by: name another with --guide")
    return carried


def check_weaker(net: nn.Module, guide: nn.Module | None, name: str, whose: str = "model") -> None:
    """A one-line error when ``guide`` holds ``net``'s own weights: guiding by itself is the
    unguided sampler at twice the cost."""
    if guide is not None and weights_digest(guide) == weights_digest(net):
        raise DifflabError(
            f"the guide {name} holds the {whose}'s own weights (an unguided sampler at twice the "
            "cost): name a weaker model, e.g. an earlier checkpoint folder"
        )
