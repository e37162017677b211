"""Faults and bad input: a clear one-line error every time, and no run ever lost.

Processes that must die (kill -9, SIGTERM, SIGINT, a held lock, a real file-size limit) run as
subprocesses of ``python -m difflab``; everything else calls ``main`` in-process. Each training
subprocess uses one torch thread: the machine is small and shared.
"""

from __future__ import annotations

import errno
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import save_file

from difflab.api import load_run
from difflab.config import from_dict
from difflab.errors import DifflabError
from difflab.metrics.fid import FeatureStats, load_stats, save_stats
from difflab.objectives import Objective
from difflab.registry import build_network
from difflab.train import checkpoint as C
from difflab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from difflab.train.trainer import Trainer

FAST = ["--no-progress", "--set", "train.sample_every_kimg=0"]
WAIT_S = 90  # generous: the machine is shared, so a step can take a while


# --------------------------------------------------------------------------- helpers


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


@pytest.fixture
def trained(tmp_path, tiny_preset, image_folder, capsys) -> Path:
    """A run with checkpoints at steps 3 and 6."""
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(tiny_preset, image_folder, run_dir, "--steps", 6))
    assert code == 0, err
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000003", "step-00000006"]
    return run_dir


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


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _folder_of_random_bytes(folder: Path) -> None:
    shutil.rmtree(folder)
    _random_bytes(folder)


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
    "truncated-state": (lambda f: _truncate(f / "state.pt"), "unreadable"),
    "truncated-weights": (lambda f: _truncate(f / "net.safetensors"), "not a readable"),
    "random-state": (lambda f: _random_bytes(f / "state.pt"), "unreadable"),
    "random-weights": (lambda f: _random_bytes(f / "ema.safetensors"), "not a readable"),
    "random-file": (_folder_of_random_bytes, "not a checkpoint folder"),
    "missing-state": (lambda f: (f / "state.pt").unlink(), "no state.pt"),
    "future-format": (_future_format, "has format"),
    "other-network": (_other_network, "do not match this network"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_resume_falls_back(trained, tmp_path, capsys, kind):
    damage, message = DAMAGE[kind]
    bad = list_checkpoints(trained)[-1]
    damage(bad)
    with pytest.raises(DifflabError, match=message) as error:
        load_run(trained, checkpoint=bad, device="cpu")
    assert "\n" not in str(error.value)
    code, _, err = run_cli(capsys, "sample", trained, "--checkpoint", bad, "--out", tmp_path / "s")
    assert_one_line_error(code, err, message)
    code, out, err = run_cli(capsys, "sample", trained, "--num", 2, "--out", tmp_path / "d")
    assert code == 0 and "step 3 weights" in out and "skipping" in err, err  # falls back
    code, out, err = run_cli(capsys, "train", "--resume", trained, "--steps", 8, "--no-progress")
    assert code == 0 and "to step 8" in out, err
    assert "skipping" in err and bad.name in err and "step-00000003 (step 3" in err, err
    assert assert_every_checkpoint_loads(trained) == 8


def test_resume_refuses_to_start_over_when_no_checkpoint_is_readable(trained, capsys):
    for folder in list_checkpoints(trained):
        _random_bytes(folder / "state.pt")
    code, _, err = run_cli(capsys, "train", "--resume", trained, "--no-progress")
    assert_one_line_error(code, err, "none of the 2 checkpoints")
    assert [p.name for p in list_checkpoints(trained)] == ["step-00000003", "step-00000006"]


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
def test_disk_full_keeps_the_previous_checkpoint(trained, capsys, monkeypatch, fault):
    name, calls, error, message = WRITE_FAULTS[fault]
    before = {p.name: folder_bytes(p) for p in list_checkpoints(trained)}
    if name == "torch":
        monkeypatch.setattr(C, "torch", _torch_with_failing_save(error))
    else:
        _fail_after(monkeypatch, name, calls, error)
    code, _, err = run_cli(capsys, "train", "--resume", trained, "--steps", 9, "--no-progress")
    assert_one_line_error(code, err, message, "step-00000009")
    assert {p.name: folder_bytes(p) for p in list_checkpoints(trained)} == before
    assert not list(C.checkpoint_dir(trained).glob(".*"))  # no half-written folder left
    monkeypatch.undo()
    assert assert_every_checkpoint_loads(trained) == 6


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
def test_a_real_write_failure_is_one_line_and_keeps_the_checkpoints(trained, limit, reason):
    """RLIMIT_FSIZE makes the real safetensors / torch.save writes fail (EFBIG) mid-file."""
    before = {p.name: folder_bytes(p) for p in list_checkpoints(trained)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "difflab", "train", "--resume", str(trained), "--steps", "9"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limit_file_size(limit),
        timeout=WAIT_S,
    )
    assert_one_line_error(result.returncode, result.stderr, "could not write checkpoint", reason)
    assert {p.name: folder_bytes(p) for p in list_checkpoints(trained)} == before
    assert not list(C.checkpoint_dir(trained).glob(".*"))


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(trained, monkeypatch):
    class Killed(BaseException):
        pass

    def die_half_way(path, *args, **kwargs):
        (Path(path) / "net.safetensors").unlink()  # one file gone, then the process "dies"
        raise Killed

    monkeypatch.setattr(C.shutil, "rmtree", die_half_way)
    with pytest.raises(Killed):
        C.prune_checkpoints(trained, keep_last=1, snapshot_every=0)
    monkeypatch.undo()
    assert assert_every_checkpoint_loads(trained) == 6
    C.prune_checkpoints(trained, keep_last=1, snapshot_every=0)
    assert [p.name for p in C.checkpoint_dir(trained).iterdir()] == ["step-00000006"]


# --------------------------------------------------------------------------- settings

BAD_SETTINGS = [
    ("method.edm.p_mean=nan", "method.edm.p_mean must be a finite number, got nan"),
    ("method.edm.p_std=inf", "method.edm.p_std must be a number > 0, got inf"),
    ("sampler.s_noise=nan", "sampler.s_noise must be a number >= 0, got nan"),
    ("sampler.s_churn=-1", "sampler.s_churn must be a number >= 0, got -1.0"),
    ("train.device='meta'", "unknown device 'meta'"),
    ("train.betas=" + "[" * 3000, "train.betas: expected a list"),
]


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_settings_that_would_train_into_nan_are_refused_first(
    tmp_path, tiny_preset, image_folder, capsys, setting, message
):
    args = train_args(tiny_preset, image_folder, tmp_path / "run", "--set", setting)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- resources


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_missing_is_one_line(tmp_path, tiny_preset, image_folder, capsys):
    args = train_args(tiny_preset, image_folder, tmp_path / "run", "--device", "cuda")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "no CUDA GPU is available", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_out_of_memory_is_one_line_and_the_run_resumes(trained, capsys, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    code, _, err = run_cli(capsys, "train", "--resume", trained, "--steps", 8, "--no-progress")
    line = assert_one_line_error(code, err)
    assert line == "difflab: error: out of memory; lower --batch-size or raise train.accumulation"
    monkeypatch.undo()
    code, out, err = run_cli(capsys, "train", "--resume", trained, "--steps", 8, "--no-progress")
    assert code == 0 and "to step 8" in out, err


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


# --------------------------------------------------------------------------- data


def test_corrupt_and_truncated_images_are_named_and_skipped(
    tmp_path, tiny_preset, image_folder, capsys
):
    good = image_folder / "cars" / "000.png"
    (image_folder / "cars" / "truncated.png").write_bytes(good.read_bytes()[:40])
    (image_folder / "cars" / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    (image_folder / "ships" / "empty.png").write_bytes(b"")
    args = train_args(tiny_preset, image_folder, tmp_path / "run", "--steps", 1)
    code, _out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "skipped 3 unreadable images" in err
    for name in ("cars/truncated.png", "cars/noise.jpg", "ships/empty.png"):
        assert name in err
    assert "24 images" in err


def test_a_data_set_smaller_than_the_batch_trains_with_a_warning(tmp_path, tiny_preset, capsys):
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(folder / f"{i}.png")
    args = train_args(tiny_preset, folder, tmp_path / "run", "--steps", 2)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "to step 2" in out, err
    assert "smaller than the batch (8)" in err


def _mixed_images(folder: Path) -> int:
    """One image per PIL mode, size and format that a user folder may hold."""
    folder.mkdir()
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    images = {
        "rgb-wide.png": rgb,
        "tall.jpg": rgb.resize((5, 40)),
        "one-pixel.png": Image.new("RGB", (1, 1), (9, 9, 9)),
        "gray.png": rgb.convert("L"),
        "gray-alpha.png": rgb.convert("LA"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.gif": rgb.convert("P"),
        "bilevel.bmp": rgb.convert("1"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "int32.tiff": rgb.convert("I"),
        "float.tiff": rgb.convert("F"),
        "big.webp": rgb.resize((300, 200)),
    }
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    images["palette-transparent.png"] = palette
    sixteen = Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16))
    images["sixteen-bit.png"] = sixteen
    for name, image in images.items():
        image.save(folder / name)
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    return len(images) + 1


def test_mixed_sizes_and_modes_all_load_and_train(tmp_path, tiny_preset, capsys):
    count = _mixed_images(tmp_path / "mixed")
    args = train_args(tiny_preset, tmp_path / "mixed", tmp_path / "run", "--steps", 2)
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "to step 2" in out, err
    assert f"({count} images)" in err and "unreadable" not in err, err


# --------------------------------------------------------------------------- reference statistics


def _stats(dim: int = 8) -> FeatureStats:
    features = np.random.default_rng(3).normal(size=(20, dim)).astype(np.float32)
    mu, sigma = features.mean(0).astype(np.float64), np.cov(features, rowvar=False)
    return FeatureStats(mu, sigma, features, 20, {"source": "test"})


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _valid_arrays(dim: int = 8) -> dict:
    s = _stats(dim)
    return {
        "format_version": np.asarray(1),
        "mu": s.mu,
        "sigma": s.sigma,
        "num_images": np.asarray(20),
        "meta": np.asarray('{"source": "test"}'),
    }


STATS_FAULTS = {
    "random-bytes": (lambda p: _random_bytes(p), "not a valid .npz"),
    "truncated": (lambda p: (save_stats(_stats(), p), _truncate(p)), "not a valid .npz"),
    "not-stats": (lambda p: _npz(p, images=np.zeros(3)), "lacks keys"),
    "future-version": (
        lambda p: _npz(p, **{**_valid_arrays(), "format_version": np.asarray(9)}),
        "format version",
    ),
    "pickled-object": (
        lambda p: _npz(p, **{**_valid_arrays(), "mu": np.array([{}], dtype=object)}),
        "not a valid .npz",
    ),
    "meta-not-json": (
        lambda p: _npz(p, **{**_valid_arrays(), "meta": np.asarray("{oops")}),
        "malformed",
    ),
    "nan-mean": (
        lambda p: _npz(p, **{**_valid_arrays(), "mu": np.full(8, np.nan)}),
        "NaN",
    ),
    "dimension-mismatch": (lambda p: save_stats(_stats(dim=16), p), "feature dimension 8"),
    "missing-file": (lambda p: None, "not found"),
}


@pytest.mark.parametrize("fault", list(STATS_FAULTS))
def test_bad_reference_statistics_are_one_clear_error(tmp_path, fault):
    make, message = STATS_FAULTS[fault]
    path = tmp_path / "ref.npz"
    make(path)
    with pytest.raises(DifflabError, match=message) as error:
        load_stats(path, expected_dim=8)
    assert "\n" not in str(error.value)


def test_good_reference_statistics_round_trip(tmp_path):
    stats = load_stats(save_stats(_stats(), tmp_path / "ref.npz"), expected_dim=8)
    assert stats.num_images == 20 and stats.features.shape == (20, 8)


def test_sample_skips_a_newest_checkpoint_of_another_network(
    tmp_path, tiny_preset, image_folder, capsys
):
    """Without --checkpoint, load_run falls back to the newest checkpoint that fits."""
    import shutil

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
    from safetensors.torch import load_file, save_file

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
