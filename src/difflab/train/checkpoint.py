"""Checkpoints: state_dicts in safetensors plus the training state, written atomically.

Layout: ``RUN_DIR/checkpoints/step-00001000/`` holding ``net.safetensors``, ``ema.safetensors``
(when EMA is on) and ``state.pt`` (optimizer, step, images seen, config). A checkpoint folder is
written under a temporary name, every file fsync'ed, then renamed: a reader (or a process that
was killed half-way) only ever sees complete checkpoints.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.errors import DifflabError
from difflab.io import fsync_dir

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
log = logging.getLogger("difflab")


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
) -> Path:
    """Write checkpoint ``step`` atomically; on failure the earlier checkpoints stay intact."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    metadata = {"config": json.dumps(state["config"]), "step": str(step)}
    try:
        tmp.mkdir()
        save_file(_state_dict_cpu(net), str(tmp / "net.safetensors"), metadata=metadata)
        if ema is not None:
            save_file(_state_dict_cpu(ema), str(tmp / "ema.safetensors"), metadata=metadata)
        torch.save({**state, "format": FORMAT_VERSION, "step": step}, tmp / "state.pt")
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. stop right after a resume)
            old = folder / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(folder)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise DifflabError(
                f"disk full while writing checkpoint {final.name}; the previous checkpoints in "
                f"{folder} are intact: free some space, then resume with --resume"
            ) from None
        raise DifflabError(f"could not write checkpoint {final} ({error})") from None
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: Path, keep_last: int, snapshot_every: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and every snapshot (step % snapshot_every == 0)."""
    folder = checkpoint_dir(run_dir)
    for stale in folder.glob(".tmp-*"):  # left by a process killed while writing
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    paths = list_checkpoints(run_dir)
    for path in paths[: max(len(paths) - keep_last, 0)]:
        step = int(_STEP_DIR.match(path.name).group(1))
        if snapshot_every and step % snapshot_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint folder; anything unreadable is a DifflabError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise DifflabError(f"checkpoint {path} does not exist (see {path.parent} for the others)")
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
    net = _load_weights(path / "net.safetensors")
    ema = _load_weights(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None
    return Checkpoint(path, int(state["step"]), net, ema, state)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DifflabError(f"{path} is missing: the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise DifflabError(f"{path} is not a readable safetensors file ({error})") from None


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint; unreadable newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except DifflabError as error:
            log.warning("skipping a damaged checkpoint: %s", error)
    return None


def load_weights_into(module: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a one-line error when the weights belong to another network."""
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise DifflabError(
            f"weights in {source} do not match this network ({first[:160]}); check the config's "
            "network settings"
        ) from None
