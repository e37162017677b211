"""Damaged checkpoints, full disks and failed writes: one line, and the run survives."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from reliability import (
    WAIT_S,
    assert_every_checkpoint_loads,
    assert_one_line_error,
    folder_bytes,
    random_bytes,
    truncate,
)
from safetensors.torch import save_file

from difflab.api import load_run
from difflab.config import from_dict
from difflab.errors import DifflabError
from difflab.registry import build_network
from difflab.train import checkpoint as C
from difflab.train.checkpoint import list_checkpoints, load_checkpoint

# --------------------------------------------------------------------------- damaged checkpoints


def _folder_of_random_bytes(folder: Path) -> None:
    shutil.rmtree(folder)
    random_bytes(folder)


def _future_format(folder: Path) -> None:
    state = torch.load(folder / "state.pt", weights_only=True)
    torch.save({**state, "format": C.FORMAT_VERSION + 1}, folder / "state.pt")


def _other_network(folder: Path) -> None:
    """Weights of the same network with 16 channels instead of 8."""
    other = from_dict(load_checkpoint(folder).config)
    other.network.unet.channels = 16
    weights = {k: v.contiguous() for k, v in build_network(other).state_dict().items()}
    for name in ("net", "ema"):
        save_file(weights, str(folder / f"{name}.safetensors"))


DAMAGE = {
    "truncated-state": (lambda f: truncate(f / "state.pt"), "unreadable"),
    "truncated-weights": (lambda f: truncate(f / "net.safetensors"), "not a readable"),
    "random-state": (lambda f: random_bytes(f / "state.pt"), "unreadable"),
    "random-weights": (lambda f: random_bytes(f / "ema.safetensors"), "not a readable"),
    "random-file": (_folder_of_random_bytes, "not a checkpoint folder"),
    "missing-state": (lambda f: (f / "state.pt").unlink(), "no state.pt"),
    "future-format": (_future_format, "has format"),
    "other-network": (_other_network, "do not match this network"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_resume_falls_back(
    checkpointed, tmp_path, capsys, kind
):
    damage, message = DAMAGE[kind]
    bad = list_checkpoints(checkpointed)[-1]
    damage(bad)
    with pytest.raises(DifflabError, match=message) as error:
        load_run(checkpointed, checkpoint=bad, device="cpu")
    assert "\n" not in str(error.value)
    code, _, err = run_cli(
        capsys, "sample", checkpointed, "--checkpoint", bad, "--out", tmp_path / "s"
    )
    assert_one_line_error(code, err, message)
    code, out, err = run_cli(capsys, "sample", checkpointed, "--num", 2, "--out", tmp_path / "d")
    assert code == 0 and "step 3 weights" in out and "skipping" in err, err  # falls back
    code, out, err = run_cli(
        capsys, "train", "--resume", checkpointed, "--steps", 8, "--no-progress"
    )
    assert code == 0 and "to step 8" in out, err
    assert "skipping" in err and bad.name in err and "step-00000003 (step 3" in err, err
    assert assert_every_checkpoint_loads(checkpointed) == 8


def test_resume_refuses_to_start_over_when_no_checkpoint_is_readable(checkpointed, capsys):
    for folder in list_checkpoints(checkpointed):
        random_bytes(folder / "state.pt")
    code, _, err = run_cli(capsys, "train", "--resume", checkpointed, "--no-progress")
    assert_one_line_error(code, err, "none of the 2 checkpoints")
    assert [p.name for p in list_checkpoints(checkpointed)] == ["step-00000003", "step-00000006"]


# --------------------------------------------------------------------------- disk full


def _fail_after(monkeypatch, name: str, calls: int, error: BaseException) -> None:
    """``difflab.train.checkpoint.<name>`` works ``calls`` times, then raises ``error``."""
    original, count = getattr(C, name), {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(C, name, flaky)


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
WRITE_FAULTS = {
    "save_file-ENOSPC": ("save_file", 1, ENOSPC, "disk full"),  # net written, ema fails
    "torch.save-ENOSPC": ("torch", 0, ENOSPC, "disk full"),
    "torch.save-RuntimeError": (
        "torch",
        0,
        RuntimeError("PytorchStreamWriter failed"),
        "could not",
    ),
}


@pytest.mark.parametrize("fault", list(WRITE_FAULTS))
def test_disk_full_keeps_the_previous_checkpoint(checkpointed, capsys, monkeypatch, fault):
    name, calls, error, message = WRITE_FAULTS[fault]
    before = {p.name: folder_bytes(p) for p in list_checkpoints(checkpointed)}
    if name == "torch":
        monkeypatch.setattr(C, "torch", _torch_with_failing_save(error))
    else:
        _fail_after(monkeypatch, name, calls, error)
    code, _, err = run_cli(capsys, "train", "--resume", checkpointed, "--steps", 9, "--no-progress")
    assert_one_line_error(code, err, message, "step-00000009")
    assert {p.name: folder_bytes(p) for p in list_checkpoints(checkpointed)} == before
    assert not list(C.checkpoint_dir(checkpointed).glob(".*"))  # no half-written folder left
    monkeypatch.undo()
    assert assert_every_checkpoint_loads(checkpointed) == 6


def _torch_with_failing_save(error: BaseException):
    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def save(*args, **kwargs):
            raise error

    return _Torch()


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    ("limit", "reason"),
    [(100_000, "File too large"), (300_000, "RuntimeError")],
    ids=["safetensors-fails", "torch.save-fails"],
)
def test_a_real_write_failure_is_one_line_and_keeps_the_checkpoints(checkpointed, limit, reason):
    """RLIMIT_FSIZE makes the real safetensors / torch.save writes fail (EFBIG) mid-file."""
    before = {p.name: folder_bytes(p) for p in list_checkpoints(checkpointed)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "difflab", "train", "--resume", str(checkpointed), "--steps", "9"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size(limit),
        timeout=WAIT_S,
    )
    assert_one_line_error(result.returncode, result.stderr, "could not write checkpoint", reason)
    assert {p.name: folder_bytes(p) for p in list_checkpoints(checkpointed)} == before
    assert not list(C.checkpoint_dir(checkpointed).glob(".*"))


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(checkpointed, monkeypatch):
    class Killed(BaseException):
        pass

    def die_half_way(path, *args, **kwargs):
        (Path(path) / "net.safetensors").unlink()  # one file gone, then the process "dies"
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", die_half_way)  # how difflab.io deletes a folder
    with pytest.raises(Killed):
        C.prune_checkpoints(checkpointed, keep_last=1, snapshot_every=0, step=6)
    monkeypatch.undo()
    assert assert_every_checkpoint_loads(checkpointed) == 6
    C.prune_checkpoints(checkpointed, keep_last=1, snapshot_every=0, step=6)
    assert [p.name for p in C.checkpoint_dir(checkpointed).iterdir()] == ["step-00000006"]
