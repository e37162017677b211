"""Faults: a clear one-line error every time, and no run ever lost.

Processes that must die (kill -9, SIGTERM, SIGINT, a held lock) run as subprocesses of
``python -m difflab``; everything else calls ``main`` in-process. Each training subprocess uses
one torch thread: the machine is small and shared. Damaged checkpoints and write failures are in
``test_reliability_checkpoints.py``, bad data and settings in ``test_reliability_data.py``.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from reliability import (
    assert_every_checkpoint_loads,
    assert_one_line_error,
    finish,
    folder_bytes,
    spawn,
    train_args,
    wait_for_step_above,
)
from safetensors.torch import save_file

from difflab.errors import DifflabError
from difflab.objectives import Objective
from difflab.train import checkpoint as C
from difflab.train.checkpoint import list_checkpoints, load_checkpoint
from difflab.train.trainer import Trainer

# --------------------------------------------------------------------------- kill -9


def test_kill_9_at_random_moments_never_loses_the_run(tmp_path, tiny_preset, image_folder):
    rng = random.Random(20240601)
    run_dir, total, kills, lost, mid_write = tmp_path / "run", 60, 0, 0, 0
    first = train_args(tiny_preset, image_folder, run_dir, "--steps", total)
    resume = ["train", "--resume", run_dir, "--no-progress"]
    step = 0
    for attempt in range(5):
        args = (resume if attempt else first) + ["--checkpoint-every", 1]
        proc = spawn(args, tmp_path / f"kill-{attempt}.log")
        try:
            wait_for_step_above(run_dir, step, proc)
            time.sleep(rng.uniform(0.0, 0.5))  # mid-step, mid-checkpoint or mid-prune
            assert proc.poll() is None, (tmp_path / f"kill-{attempt}.log").read_text()
            proc.send_signal(signal.SIGKILL)
        finally:
            finish(proc)
        kills += proc.returncode == -signal.SIGKILL
        mid_write += any(p.name.startswith(".") for p in C.checkpoint_dir(run_dir).iterdir())
        try:
            step = assert_every_checkpoint_loads(run_dir)
        except (AssertionError, DifflabError):
            lost += 1
            raise
    proc = spawn(resume, tmp_path / "final.log")
    assert finish(proc) == 0, (tmp_path / "final.log").read_text()
    assert f"to step {total}" in (tmp_path / "final.log").read_text()
    assert assert_every_checkpoint_loads(run_dir) == total
    assert not [p.name for p in C.checkpoint_dir(run_dir).iterdir() if p.name.startswith(".")]
    print(f"\nkill -9: {kills} kills survived ({mid_write} mid-write), {lost} runs lost")
    assert (kills, lost) == (5, 0)


# --------------------------------------------------------------------------- SIGTERM, SIGINT


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(
    tmp_path, tiny_preset, image_folder, capsys, signum
):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    args = train_args(tiny_preset, image_folder, run_dir, "--steps", 40, "--checkpoint-every", 1)
    proc = spawn(args, log)
    try:
        wait_for_step_above(run_dir, 0, proc)
        proc.send_signal(signum)
    finally:
        code = finish(proc)
    text = log.read_text()
    assert code == 128 + signum, text
    line = text.strip().splitlines()[-1]
    assert "Traceback" not in text
    assert line.startswith("difflab: stopped by") and f"--resume {run_dir}" in line, text
    stopped_at = int(re.search(r"at step (\d+)", line).group(1))
    assert assert_every_checkpoint_loads(run_dir) == stopped_at
    code, out, err = run_cli(capsys, "train", "--resume", run_dir, "--no-progress")
    assert code == 0 and "to step 40" in out, err
    assert f"resuming from {C.checkpoint_dir(run_dir) / f'step-{stopped_at:08d}'}" in err


# --------------------------------------------------------------------------- NaN and Inf


@pytest.fixture
def checkpoint_before_each_step(monkeypatch):
    """Records the newest checkpoint's bytes before every optimizer step."""
    seen: dict = {}
    original = Trainer.train_step

    def step(self):
        paths = list_checkpoints(self.run_dir)
        if paths:
            seen.update(path=paths[-1], files=folder_bytes(paths[-1]), step=self.step + 1)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    return seen


def poison_from_step(monkeypatch, bad_step: int, poison) -> None:
    """From optimizer step ``bad_step`` on, the per-sample loss goes through ``poison``."""
    state = {"on": False}
    original_step, original_loss = Trainer.train_step, Objective.loss

    def step(self):
        state["on"] = self.step + 1 >= bad_step
        try:
            return original_step(self)
        finally:
            state["on"] = False

    def loss(self, *args, **kwargs):
        out = original_loss(self, *args, **kwargs)
        return poison(out) if state["on"] else out

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Objective, "loss", loss)


def assert_last_good_checkpoint_kept(run_dir: Path, seen: dict, bad_step: int) -> None:
    newest = list_checkpoints(run_dir)[-1]
    assert seen["step"] == bad_step and newest == seen["path"]
    assert newest.name == f"step-{bad_step - 1:08d}"
    assert folder_bytes(newest) == seen["files"]
    weights = load_checkpoint(newest).net
    assert all(torch.isfinite(w).all() for w in weights.values())


POISONS = {
    "nan-loss": lambda out: out * math.nan,
    "inf-loss": lambda out: out + math.inf,
    # finite loss, NaN gradient: d/dx sqrt(x) at 0 is inf, times 0
    "nan-gradient": lambda out: out + 0 * torch.sqrt(out - out.detach()),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_preset, image_folder, capsys, monkeypatch, checkpoint_before_each_step, poison
):
    bad_step, run_dir = 4, tmp_path / "run"
    poison_from_step(monkeypatch, bad_step, POISONS[poison])
    args = train_args(tiny_preset, image_folder, run_dir, "--steps", 8, "--checkpoint-every", 1)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, f"at step {bad_step}", "last good checkpoint")
    assert_last_good_checkpoint_kept(run_dir, checkpoint_before_each_step, bad_step)
    monkeypatch.undo()
    code, out, err = run_cli(capsys, "train", "--resume", run_dir, "--no-progress")
    assert code == 0 and "to step 8" in out, err


def test_a_huge_learning_rate_stops_with_the_step_named(
    tmp_path, tiny_preset, image_folder, capsys, checkpoint_before_each_step
):
    run_dir = tmp_path / "run"
    args = train_args(tiny_preset, image_folder, run_dir, "--steps", 8, "--checkpoint-every", 1)
    code, _, err = run_cli(capsys, *args, "--set", "train.lr=1e30")
    line = assert_one_line_error(code, err, "lower train.lr")
    bad_step = int(re.search(r"at step (\d+)", line).group(1))
    assert_last_good_checkpoint_kept(run_dir, checkpoint_before_each_step, bad_step)


# --------------------------------------------------------------------------- the lock


def test_a_second_process_is_refused_and_a_killed_owner_leaves_no_lock(
    tmp_path, tiny_preset, image_folder, capsys
):
    run_dir = tmp_path / "run"
    args = train_args(tiny_preset, image_folder, run_dir, "--steps", 400, "--checkpoint-every", 1)
    proc = spawn(args, tmp_path / "first.log")
    try:
        wait_for_step_above(run_dir, 0, proc)
        code, _, err = run_cli(capsys, "train", "--resume", run_dir, "--no-progress")
        assert_one_line_error(code, err, "is in use by pid", str(proc.pid))
        code, _, err = run_cli(capsys, *train_args(tiny_preset, image_folder, run_dir))
        assert_one_line_error(code, err, "already holds a run")
        assert proc.poll() is None, "the refused processes must not disturb the owner"
        proc.send_signal(signal.SIGKILL)
    finally:
        finish(proc)
    assert (run_dir / ".lock").read_text().strip() == f"pid {proc.pid}"  # stale, but harmless
    step = assert_every_checkpoint_loads(run_dir)
    code, out, err = run_cli(capsys, "train", "--resume", run_dir, "--steps", step + 2)
    assert code == 0 and f"to step {step + 2}" in out, err


# --------------------------------------------------------------------------- resources


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_missing_is_one_line(tmp_path, tiny_preset, image_folder, capsys):
    args = train_args(tiny_preset, image_folder, tmp_path / "run", "--device", "cuda")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "no CUDA GPU is available", "--device cpu")
    assert not (tmp_path / "run").exists()


#: What running out of memory raises: on a GPU; on the CPU, in torch's allocator and in Python.
OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 268435456 bytes. Error code 12 (Cannot allocate memory)"
    ),
    MemoryError(),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "cpu-allocator", "python"])
def test_out_of_memory_is_one_line_and_the_run_resumes(checkpointed, capsys, monkeypatch, error):
    def oom(self):
        raise error

    monkeypatch.setattr(Trainer, "train_step", oom)
    code, _, err = run_cli(capsys, "train", "--resume", checkpointed, "--steps", 8)
    line = assert_one_line_error(code, err)  # after the progress bar, on a line of its own
    assert line == "difflab: error: out of memory; lower --batch-size or raise train.accumulation"
    monkeypatch.undo()
    code, out, err = run_cli(
        capsys, "train", "--resume", checkpointed, "--steps", 8, "--no-progress"
    )
    assert code == 0 and "to step 8" in out, err


def test_out_of_memory_while_sampling_says_to_lower_the_batch(
    checkpointed, tmp_path, capsys, monkeypatch
):
    def oom(*args, **kwargs):
        raise OUT_OF_MEMORY[1]

    monkeypatch.setattr("difflab.api.Run.generate", oom)
    code, _, err = run_cli(capsys, "sample", checkpointed, "--num", 4, "--out", tmp_path / "s")
    # the progress bar is closed first: the error is a line of its own
    line = assert_one_line_error(code, err)
    assert line == "difflab: error: out of memory; lower --batch-size"


def test_a_failing_compile_falls_back_to_eager_with_a_short_warning(
    tmp_path, tiny_preset, image_folder, capsys, monkeypatch
):
    """A compiler that fails (here: a backend raising 200 KB of "compiler output") costs one
    warning line; training goes on eagerly and gives the eager run's weights bit for bit."""
    real_compile = torch.compile

    def broken_backend(graph, example_inputs):
        raise RuntimeError("CppCompileError: C++ compile error\n" + "g++: error " * 20_000)

    monkeypatch.setattr(
        torch, "compile", lambda model, mode=None: real_compile(model, backend=broken_backend)
    )
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    try:
        args = train_args(tiny_preset, image_folder, compiled, "--steps", 3)
        code, _, err = run_cli(capsys, *args, "--set", "train.compile=true")
    finally:
        monkeypatch.undo()
        torch._dynamo.reset()
    assert code == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and len(warnings[0]) < 400, warnings
    assert "BackendCompilerFailed" in warnings[0]
    code, _, err = run_cli(capsys, *train_args(tiny_preset, image_folder, eager, "--steps", 3))
    assert code == 0, err
    ours, theirs = (
        load_checkpoint(list_checkpoints(compiled)[-1]),
        load_checkpoint(list_checkpoints(eager)[-1]),
    )
    assert ours.net.keys() == theirs.net.keys()
    assert all(torch.equal(ours.net[k], theirs.net[k]) for k in ours.net)


def test_sample_skips_a_newest_checkpoint_of_another_network(
    tmp_path, tiny_preset, image_folder, capsys
):
    """Without --checkpoint, load_run falls back to the newest checkpoint that fits."""

    import difflab
    from difflab.cli import main as cli_main

    run_dir = tmp_path / "run"
    args = [
        "train",
        "--preset",
        str(tiny_preset),
        "--data",
        str(image_folder),
        "--out",
        str(run_dir),
    ]
    assert cli_main([*args, "--steps", "3", "--no-progress"]) == 0
    newest = run_dir / "checkpoints" / "step-00000009"
    shutil.copytree(run_dir / "checkpoints" / "step-00000003", newest)
    weights = newest / "net.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(weights))
    (newest / "ema.safetensors").unlink()
    run = difflab.load_run(run_dir, ema=False)
    assert run.step == 3
    assert "skipping a damaged checkpoint" in capsys.readouterr().err


def test_unknown_device_types_are_refused():
    from difflab.devices import resolve_device

    for name in ("meta", "xla", "gpu"):
        with pytest.raises(DifflabError, match="unknown device"):
            resolve_device(name)
