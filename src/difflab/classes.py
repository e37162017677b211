"""Class labels: which classes a run learns, and which class each sampled image asks for.

A conditional run (``data.conditional = true``) learns p(x | class) for every class of its data
and, through label dropout, p(x) too; the class names are stored in its config, so runs and
exported files know them. A label of -1 means "no class" everywhere.

Labels for sampling are bound at the edge (``Run.generate``, the CLI, the previews): a request
is a class name or index, a list of them, or "all" (image i asks for class i mod C, so every
class gets the same number and the first C images hold one of each).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.config import Config
from difflab.errors import DifflabError

log = logging.getLogger("difflab")
LabelRequest = str | int | Sequence[str | int] | Tensor | None  # or a numpy array
_SHOWN = 30


def learn_classes(config: Config, class_names: list[str], source: str) -> Config:
    """The config with the classes it learns from data whose classes are ``class_names``.

    Unconditional configs are returned unchanged. A conditional one stores the names and gives
    the network one class embedding per class; with fewer than two classes (a flat folder, or
    ``--class`` restricting the data to one) it trains unconditionally, with a note.
    """
    if not config.data.conditional:
        return config
    if config.network.name != "unet":
        raise DifflabError(
            f"data.conditional needs a network that takes classes (unet), not "
            f"{config.network.name}; drop data.conditional or use --network unet"
        )
    names = _learned(config, class_names)
    check_learned(config, class_names, source)
    if not names:
        log.warning("%s has one class here: training unconditionally", source)
    data = dataclasses.replace(config.data, class_names=names)
    unet = dataclasses.replace(config.network.unet, num_classes=len(names))
    network = dataclasses.replace(config.network, unet=unet)
    return dataclasses.replace(config, data=data, network=network)


def check_learned(config: Config, class_names: Sequence[str], source: str) -> None:
    """A one-line error unless data whose classes are ``class_names`` has the classes the run
    (or a student's teacher) learned; before any folder is made."""
    stored = config.data.class_names
    names = _learned(config, class_names)
    if config.data.conditional and stored and stored != names:
        raise DifflabError(
            f"the run learned the classes {_listed(stored)}, but {source} has {_listed(names)}; "
            "give data with those class folders (the data it was trained on)"
        )


def _learned(config: Config, class_names: Sequence[str]) -> list[str]:
    restricted = config.data.class_name is not None  # --class: one class, so no classes
    return list(class_names) if len(class_names) >= 2 and not restricted else []


def labels_for(
    request: LabelRequest, class_names: list[str], num: int, start: int = 0
) -> Tensor | None:
    """One class index per image ``start .. start + num - 1``, or None for no labels."""
    if request is None:
        return None
    if not class_names:
        raise DifflabError(
            "this run is unconditional (trained without classes); drop --label / label="
        )
    count = len(class_names)
    if isinstance(request, str) and request.strip().lower() == "all":
        return torch.arange(start, start + num) % count
    if hasattr(request, "tolist"):  # a tensor or numpy array of class indices
        request = request.tolist()
    if isinstance(request, str | int):
        return torch.full((num,), class_index(request, class_names), dtype=torch.int64)
    if not isinstance(request, Sequence):
        raise DifflabError(
            f"label must be a class name or index, a list of them or 'all', got {request!r}"
        )
    chosen = [class_index(item, class_names) for item in request]
    if len(chosen) != num:
        raise DifflabError(f"got {len(chosen)} labels for {num} images; give one per image")
    return torch.tensor(chosen, dtype=torch.int64)


def bind_request(
    request: LabelRequest,
    guidance: float | None,
    class_names: list[str],
    num: int,
    start: int = 0,
    default_guidance: float = 1.0,
    guided: bool = False,
) -> tuple[Tensor | None, float]:
    """The labels of images ``start .. start + num - 1`` and the guidance weight for a request,
    checked: without labels or a guide (``guided``), guidance has nothing to guide by."""
    labels = labels_for(request, class_names, num, start)
    if guidance is None:
        return labels, default_guidance
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, int | float)
        or not 0 <= guidance <= 100
    ):
        raise DifflabError(f"guidance must be a number in [0, 100], got {guidance!r}")
    if labels is None and guidance != 1.0 and not guided:
        raise DifflabError(
            "guidance needs a label to guide towards, or a guide (--guide / guide=); give one"
        )
    return labels, float(guidance)


def per_class(
    request: LabelRequest, class_names: list[str], num: int, flag: str = "--num"
) -> int | None:
    """Images per class when ``request`` is "all" (None otherwise); "all" gives every class the
    same number, so ``num`` must be a multiple of the class count."""
    if not (isinstance(request, str) and request.strip().lower() == "all" and class_names):
        return None
    count = len(class_names)
    if num % count:
        raise DifflabError(
            f"label all gives each of the {count} classes the same number of images: make {flag} "
            f"a multiple of {count} (e.g. {max(count, num - num % count)})"
        )
    return num // count


def class_index(label: str | int, class_names: list[str]) -> int:
    """A class given by name (any case) or index; a one-line error lists the classes."""
    if isinstance(label, str):
        folded = [name.casefold() for name in class_names]
        if label.casefold() in folded:
            return folded.index(label.casefold())
        if label.strip().isdigit():
            label = int(label.strip())
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(class_names):
        return label
    raise DifflabError(f"unknown label {label!r}; this run's classes: {_listed(class_names)}")


def class_rows(images: Tensor, num_classes: int) -> tuple[Tensor, int]:
    """Images labelled "all" (class i mod C) rearranged one class per row: (images, per row)."""
    per_class = len(images) // num_classes
    rows = images[: per_class * num_classes].unflatten(0, (per_class, num_classes))
    return rows.transpose(0, 1).flatten(0, 1), per_class


def _listed(names: list[str]) -> str:
    shown = ", ".join(f"{i}={name}" for i, name in enumerate(names[:_SHOWN]))
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return (shown + more) or "none"
