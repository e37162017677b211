"""Checkpoints: state_dicts in safetensors plus the training state, written atomically.

Layout: ``RUN_DIR/checkpoints/step-00001000/`` holding ``net.safetensors``, ``ema.safetensors``
(when EMA is on) and ``state.pt`` (optimizer, step, images seen, config). A checkpoint folder is
written under a temporary name, every file fsync'ed, then renamed: a reader (or a process that
was killed half-way) only ever sees complete checkpoints.

``load_model`` reads a network's weights from a run directory or an exported file; it sits
below both the Python API (``difflab.api``) and the trainer (``--init``), which use it. A run
with autoguidance (``sampler.guide_at``) keeps the checkpoint of its guide step (marked
``GUIDE_MARK``); ``difflab.train.guides`` reads guides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.config import Config, from_dict, load_json, upgrade, validate
from difflab.errors import DifflabError, brief
from difflab.io import (
    WRITE_ERRORS,
    delete_path,
    disk_full,
    publish_folder,
)

FORMAT_VERSION = 1
GUIDE_MARK = "guide"  # an empty file in the checkpoint folder of a run's guide
GUIDE_PREFIX = "guide."  # an export's keys of its run's guide, beside the model's own
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
log = logging.getLogger("difflab")
T = TypeVar("T")


@dataclass
class Checkpoint:
    path: Path
    step: int
    net: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    net: nn.Module,
    ema: nn.Module | None,
    state: dict[str, Any],
    guide: bool = False,
) -> Path:
    """Write checkpoint ``step`` atomically; on failure the earlier checkpoints stay intact.
    ``guide``: it is the run's guide (autoguidance), marked so that pruning keeps it."""
    folder = checkpoint_dir(run_dir)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        delete_path(tmp)
        tmp.mkdir()
        if guide:
            (tmp / GUIDE_MARK).touch()
        _write_files(tmp, step, net, ema, state)
        publish_folder(tmp, final)
    except WRITE_ERRORS as error:  # safetensors and torch.save do not raise OSError
        delete_path(tmp)
        raise _write_error(error, final) from None
    return final


def _write_files(
    tmp: Path, step: int, net: nn.Module, ema: nn.Module | None, state: dict[str, Any]
) -> None:
    metadata = {"config": json.dumps(state["config"]), "step": str(step)}
    if "data" in state:  # what the run trained on (train.rundir.data_record)
        metadata["data"] = json.dumps(state["data"])
    save_file(_state_dict_cpu(net), str(tmp / "net.safetensors"), metadata=metadata)
    if ema is not None:
        save_file(_state_dict_cpu(ema), str(tmp / "ema.safetensors"), metadata=metadata)
    torch.save({**state, "format": FORMAT_VERSION, "step": step}, tmp / "state.pt")


def _write_error(error: Exception, final: Path) -> DifflabError:
    reason = brief(error, 200)
    intact = f"the previous checkpoints in {final.parent} are intact"
    if disk_full(error):
        return DifflabError(
            f"disk full while writing checkpoint {final.name}; {intact}: free some space, "
            "then resume with --resume"
        )
    return DifflabError(f"could not write checkpoint {final} ({reason}); {intact}")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: Path, keep_last: int, snapshot_every: int, step: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``step`` (the one just written), every
    snapshot (step % snapshot_every == 0) and every guide (a folder marked ``GUIDE_MARK``).
    Folders past ``step`` (damaged ones a resume skipped) are not counted: they would push the
    new checkpoints out. Training replaces each when it reaches its step."""
    folder = checkpoint_dir(run_dir)
    for pattern in (".tmp-*", ".old-*", ".del-*"):  # left by a process killed half-way
        for stale in folder.glob(pattern):
            if pattern == ".del-*" or not stale.name.endswith(f"-{os.getpid()}"):
                delete_path(stale)
    paths = [path for path in list_checkpoints(run_dir) if checkpoint_step(path) <= step]
    for path in paths[: max(len(paths) - keep_last, 0)]:
        older = checkpoint_step(path)
        if (snapshot_every and older % snapshot_every == 0) or (path / GUIDE_MARK).exists():
            continue
        _remove_checkpoint(path)


def _remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a kill half-way leaves a ``.del-*`` folder, never half a checkpoint."""
    doomed = path.with_name(f".del-{path.name}-{os.getpid()}")
    try:
        path.rename(doomed)
    except OSError:
        return
    delete_path(doomed)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint folder; anything unreadable is a DifflabError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DifflabError(f"checkpoint {path} does not exist (see {path.parent} for the others)")
    if not path.is_dir():
        raise DifflabError(f"{path} is not a checkpoint folder (they are step-* folders)")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DifflabError(
            f"checkpoint {path} has no state.pt: it is not a difflab checkpoint"
        ) from None
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise DifflabError(
            f"checkpoint {path}/state.pt is unreadable ({type(error).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else None
        raise DifflabError(
            f"checkpoint {path} has format {found}, this difflab reads format {FORMAT_VERSION}"
        )
    missing = [key for key in ("step", "images_seen", "optimizer") if key not in state]
    if missing:
        raise DifflabError(f"checkpoint {path}/state.pt lacks {', '.join(missing)}: it is damaged")
    net = read_weights(path / "net.safetensors")
    ema = read_weights(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None
    return Checkpoint(path, int(state["step"]), net, ema, state)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DifflabError(f"{path} is missing: the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise DifflabError(f"{path} is not a readable safetensors file ({error})") from None


def newest_usable(run_dir: Path, use: Callable[[Checkpoint], T]) -> T | None:
    """``use(checkpoint)`` for the newest checkpoint that loads and for which ``use`` succeeds;
    damaged or unfitting newer ones are reported and skipped. None when there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return use(load_checkpoint(path))
        except DifflabError as error:
            log.warning("skipping a damaged checkpoint: %s", error)
    return None


def newest_metadata(run_dir: Path) -> dict[str, str] | None:
    """The metadata of the newest checkpoint whose net.safetensors reads (its config, step and
    data), without loading any weights; None when there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            with safe_open(str(path / "net.safetensors"), "pt") as handle:
                return handle.metadata() or {}
        except (OSError, SafetensorError):
            continue
    return None


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint; unreadable newer ones are reported and skipped."""
    return newest_usable(run_dir, lambda checkpoint: checkpoint)


def load_weights_into(module: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a one-line error when the weights belong to another network."""
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise DifflabError(
            f"weights in {source} do not match this network ({_mismatch(module, weights, error)}); "
            "check the config's network settings"
        ) from None


def _mismatch(module: nn.Module, weights: dict[str, torch.Tensor], error: Exception) -> str:
    """The first difference between ``weights`` and ``module``'s, where torch's message puts
    it on a later line than ``brief`` keeps."""
    own = module.state_dict()
    for name, value in own.items():
        if name not in weights:
            return f"{name} missing"
        if tuple(weights[name].shape) != tuple(value.shape):
            return f"{name}: {tuple(weights[name].shape)} there, {tuple(value.shape)} here"
    extra = next((name for name in weights if name not in own), None)
    return f"{extra} not in this network" if extra else brief(error)


# --------------------------------------------------------------------------- whole models


@dataclass
class LoadedModel:
    config: Config  # the config stored with the weights
    net: nn.Module
    step: int
    source: Path
    weights: str = "ema"  # which of the checkpoint's weights: "ema" or "raw"


def load_model(
    path: str | Path,
    build: Callable[[Config], nn.Module],
    checkpoint: str | Path | None = None,
    ema: bool = True,
) -> LoadedModel:
    """``build(config)`` loaded with the weights of a run directory (its newest checkpoint whose
    weights fit, or ``checkpoint``) or of an exported .safetensors file; EMA weights unless
    ``ema`` is False."""
    path = Path(path)
    config = stored_config(path)
    net = build(config)
    if path.is_file():
        step, kind = _export_metadata(path)
        if checkpoint is not None or (not ema and kind != "raw"):
            wrong = "a choice of checkpoint" if checkpoint is not None else "raw weights"
            raise DifflabError(
                f"{path} is an export: it holds one set of weights ({kind}, step {step}), not "
                f"{wrong}; ask it for those, or export the run with the weights you want"
            )
        weights = read_weights(path)
        ours = {k: v for k, v in weights.items() if not k.startswith(GUIDE_PREFIX)}
        load_weights_into(net, ours, path)
        return LoadedModel(config, net, step, path, kind)

    kinds = []

    def use(ckpt: Checkpoint) -> int:
        weights = ckpt.ema if ema and ckpt.ema is not None else ckpt.net
        load_weights_into(net, weights, ckpt.path)
        kinds.append("raw" if weights is ckpt.net else "ema")
        return ckpt.step

    step = use(_chosen(path, config, checkpoint)) if checkpoint else newest_usable(path, use)
    if step is None:
        found = len(list_checkpoints(path))
        if found:
            raise DifflabError(
                f"none of the {found} checkpoints in {checkpoint_dir(path)} can be loaded "
                "(see the warnings above)"
            )
        raise DifflabError(f"{path} has no checkpoint yet; train it first (difflab train)")
    return LoadedModel(config, net, step, path, kinds[-1])


def _chosen(run_dir: Path, config: Config, checkpoint: str | Path) -> Checkpoint:
    """The checkpoint asked for by path, or by name among the run's, if it is of the run's
    method and network (another run's weights would load into a look-alike network)."""
    chosen = Path(checkpoint)
    if not chosen.exists() and str(checkpoint).isdecimal():  # a step number
        chosen = Path(f"step-{int(str(checkpoint)):08d}")
    if not chosen.exists() and len(chosen.parts) == 1:
        chosen = checkpoint_dir(run_dir) / chosen
    ckpt = load_checkpoint(chosen)
    theirs = from_dict(upgrade(ckpt.config))
    if (theirs.method.name, theirs.network) != (config.method.name, config.network):
        raise DifflabError(
            f"{chosen} is a checkpoint of another model ({theirs.method.name}, "
            f"{theirs.network.name}) than {run_dir}'s ({config.method.name}, "
            f"{config.network.name}); choose one of {checkpoint_dir(run_dir)}"
        )
    return ckpt


def stored_config(path: str | Path) -> Config:
    """The config stored with a run directory (config.json) or an exported .safetensors."""
    path = Path(path)
    if path.is_file():
        return validate(from_dict(upgrade(_exported_metadata(path, "config"))))
    if not path.exists():
        if path.parent.name == "checkpoints" and _STEP_DIR.match(path.name):
            kept = [p.name for p in list_checkpoints(path.parent.parent)] or ["none"]
            raise DifflabError(
                f"checkpoint {path} does not exist; {path.parent.parent} keeps: {', '.join(kept)}"
                " (train.snapshot_every keeps more)"
            )
        kind = "exported file" if path.suffix == ".safetensors" else "run directory"
        raise DifflabError(
            f"{kind} {path} does not exist; give a run directory or an exported .safetensors"
        )
    if not path.is_dir():
        raise DifflabError(f"{path} is neither a run directory nor an exported .safetensors file")
    if path.parent.name == "checkpoints" and _STEP_DIR.match(path.name):
        raise DifflabError(
            f"{path} is a checkpoint of {path.parent.parent}: give the run (sample, eval and "
            f"export take --checkpoint {path.name}, load_run checkpoint=)"
        )
    return load_json(path / "config.json")


def _exported_metadata(path: Path, key: str) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises several types for foreign files
        raise DifflabError(
            f"{path} is not a difflab export or run directory ({brief(error)})"
        ) from None
    if key not in metadata:
        raise DifflabError(
            f"{path} has no difflab {key} in its metadata: export it with difflab export"
        )
    try:
        values = json.loads(metadata[key])
    except json.JSONDecodeError:
        raise DifflabError(f"{path}: the {key} in its metadata is not valid JSON") from None
    if not isinstance(values, dict):
        raise DifflabError(f"{path}: the {key} in its metadata is not a difflab {key}")
    return values


def _export_metadata(path: Path) -> tuple[int, str]:
    """An export's step and which weights it holds ("ema" or "raw")."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    step = metadata.get("step", "0")
    return int(step) if step.isdigit() else 0, metadata.get("weights", "ema")


def split_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(the run directory or export, the checkpoint folder or None) for a path that is either,
    or a checkpoint folder of a run (``RUN/checkpoints/step-*``)."""
    path = Path(path)
    if path.parent.name == "checkpoints" and _STEP_DIR.match(path.name) and path.is_dir():
        return path.parent.parent, path
    return path, None


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (``step-00001000``)."""
    return int(_STEP_DIR.match(path.name).group(1))


def weights_digest(*modules: nn.Module) -> str:
    """A short fingerprint of the modules' weights (names, shapes, dtypes and values): the same
    weights on any device give the same text (a distilled student's teacher, checked on resume)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
