"""Helpers of the reliability tests: one-line errors, subprocess runs, checkpoint checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from difflab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

FAST = ["--no-progress", "--set", "train.sample_every_kimg=0"]
WAIT_S = 90  # generous: the machine is shared, so a step can take a while


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """The last stderr line is the error; it is one line, with no traceback."""
    assert code != 0, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("difflab: error:"), err
    for fragment in fragments:
        assert fragment in line, err
    return line


def train_args(preset: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--preset", preset, "--data", data, "--out", out, *FAST, *extra]


def spawn(args: list, log: Path) -> subprocess.Popen:
    """``python -m difflab ARGS`` with stdout and stderr in ``log`` (no pipe to fill up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "difflab", *[str(a) for a in args]],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )


def finish(proc: subprocess.Popen, timeout: float = WAIT_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def newest_step(run_dir: Path) -> int:
    paths = list_checkpoints(run_dir)
    return int(paths[-1].name.split("-")[1]) if paths else 0


def wait_for_step_above(run_dir: Path, step: int, proc: subprocess.Popen) -> int:
    """Poll until a checkpoint newer than ``step`` appears (or the process ends)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if newest_step(run_dir) > step or proc.poll() is not None:
            return newest_step(run_dir)
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint after step {step} within {WAIT_S} s")


def assert_every_checkpoint_loads(run_dir: Path) -> int:
    """Every ``step-*`` folder loads; ``.tmp-*`` and friends are never listed. Newest step."""
    paths = list_checkpoints(run_dir)
    assert paths, f"no checkpoint in {run_dir}"
    for path in paths:
        assert re.fullmatch(r"step-\d{8}", path.name), path
        assert load_checkpoint(path).step == int(path.name[5:])
    newest = latest_checkpoint(run_dir)
    assert newest is not None and newest.path == paths[-1]
    return newest.step


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
