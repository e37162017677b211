"""bench/gpu.py's correctness checks: every path of every preset, and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import ROOT

import difflab
from difflab.config import apply_overrides, load_preset
from difflab.data import ImageSet
from difflab.plans import SAMPLERS
from difflab.train.checkpoint import list_checkpoints
from difflab.train.loop import train
from difflab.viz import save_images

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
SHORT_RUN = ["train.steps=12", "train.batch_size=16", "train.num_preview=4", "train.log_every=4"]


@dataclass(frozen=True)
class Sizes:
    """How long the command-line run trains, and how many images eval's half samples."""

    steps: int = 300
    checkpoint_every: int = 100
    torchrun_steps: int = 50
    samples: int = 1000
    distill_steps: int = 30


def preset_paths(preset: str, data: ImageSet, device: torch.device, folder: Path) -> dict:
    """A short run with previews, EMA and checkpoints, then every compatible sampler."""
    overrides = [*SHORT_RUN, "train.checkpoint_every=6", "train.sample_every_kimg=0.1"]
    if not preset.startswith("tutorial"):  # previews in 4 steps, not the paper's 1,000
        overrides.append("sampler.steps=4")
    run_dir = folder / preset
    train(apply_overrides(load_preset(preset), overrides), run_dir, data=data, device=device)
    pictures = sorted(p.name for p in (run_dir / "pictures").iterdir())
    run = difflab.load_run(run_dir, device=device)
    samplers = []
    for name, spec in SAMPLERS.items():
        if spec.requires(run.method):
            steps = None if preset.startswith("tutorial") else 3
            images = run.sample(2, sampler=name, steps=steps)
            if not torch.isfinite(images).all():
                raise RuntimeError(f"{name} gave non-finite images")
            samplers.append(name)
    return {
        "pictures": len(pictures),
        "gif": "reverse-process.gif" in pictures,
        "checkpoints": len(list_checkpoints(run_dir)),
        "samplers": samplers,
    }


def difflab_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "difflab", *map(str, args)]


def run_command(command: list[str], timeout: float = 300) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[2:5])} exited {done.returncode}: {done.stderr[-300:]}"
        )
    return done.stdout + done.stderr


def train_kill_resume(data: Path, run_dir: Path, device: str, sizes: Sizes) -> dict:
    """The README's main job on the GPU: train until the first checkpoint, kill -9, resume."""
    args = difflab_command(
        *("train", "--preset", "flow-cpu", "--data", data, "--out", run_dir),
        *("--steps", sizes.steps, "--checkpoint-every", sizes.checkpoint_every),
        *("--device", device, "--no-progress", "--set", "train.sample_every_kimg=3"),
    )
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        start = time.monotonic()
        while not list_checkpoints(run_dir):
            if proc.poll() is not None or time.monotonic() - start > 180:
                raise RuntimeError(f"no checkpoint appeared: {proc.stderr.read()[-300:]!r}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = list_checkpoints(run_dir)[-1].name
    run_command(difflab_command("train", "--resume", run_dir, "--device", device, "--no-progress"))
    return {"killed_after": killed_at, "resumed_to": list_checkpoints(run_dir)[-1].name}


def sample_strip_gif(run_dir: Path, out: Path, device: str) -> dict:
    options = ("--num", 64, "--out", out, "--device", device, "--strip", "--gif")
    run_command(difflab_command("sample", run_dir, *options))
    return {"files": sorted(p.name for p in out.iterdir() if not p.name[0].isdigit())}


def torchrun_one_process(data: Path, run_dir: Path, sizes: Sizes) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    options = ("--data", data, "--out", run_dir, "--steps", sizes.torchrun_steps, "--no-progress")
    command = difflab_command("train", "--preset", "flow-cpu", *options)
    run_command([*launcher, *command[1:]])  # torchrun runs ``-m difflab`` with its own Python
    world = json.loads((run_dir / "config.json").read_text())["world_size"]
    return {"world_size": world, "checkpoint": list_checkpoints(run_dir)[-1].name}


def eval_sampling_half(run_dir: Path, tar_path: Path, device: torch.device, num: int) -> dict:
    """What ``difflab eval RUN`` samples (``Run.generate`` with the run's sampler), as PNGs in a
    tar file: ``tar xf samples.tar && difflab eval samples --ref REF.npz`` scores them."""
    run = difflab.load_run(run_dir, device=device)
    plan = run.plan()
    return {**sample_to_tar(run, plan, tar_path, num), "sampler": plan.name, "step": run.step}


def sample_to_tar(run: difflab.Run, plan, tar_path: Path, num: int) -> dict:
    """``num`` images of ``run`` sampled with ``plan``, as PNGs in a tar file (``samples/``)."""
    with tempfile.TemporaryDirectory() as folder:
        row = sample_to_folder(run, plan, Path(folder) / "samples", num)
        with tarfile.open(tar_path, "w") as tar:
            tar.add(Path(folder) / "samples", arcname="samples")
    return {**row, "tar": tar_path.name}


def sample_to_folder(
    run: difflab.Run, plan, folder: Path, num: int, chunk: int = 250, **request
) -> dict:
    """``num`` images of ``run`` sampled with ``plan`` (and ``Run.generate``'s ``request``),
    written as PNGs into ``folder``."""
    start = time.monotonic()
    for first in range(0, num, chunk):
        count = min(chunk, num - first)
        generated = run.generate(count, 0, plan=plan, batch_size=count, start=first, **request)
        save_images(generated.images, folder, start_index=first)
    seconds = time.monotonic() - start
    return {"images": num, "images_per_s": num / seconds, "evaluations": generated.evaluations}


def fewstep_paths(data: Path, folder: Path, device: str, sizes: Sizes) -> dict:
    """Issue 16's paths on the GPU, through the command line: a run that keeps its own guide
    (``sampler.guide_at``), exported with it and sampled from the export; autoguidance by a
    named checkpoint; consistency distillation from the guided teacher; the student resumed
    into a cool-down (the past-rates check) and sampled at 1 step (from ``--sigma-max 10``) and
    at 2 steps. The student has dropout, so its target pass replays the online pass's masks on
    the GPU's random state (``objectives._same_dropout``)."""
    teacher, student = folder / "teacher", folder / "student"
    export = folder / "teacher.safetensors"
    common = ("--device", device, "--no-progress")  # train and distill; sample has no bar
    run_command(
        difflab_command(
            *("train", "--preset", "flow-cpu", "--data", data, "--out", teacher),
            *("--steps", sizes.steps, "--checkpoint-every", sizes.checkpoint_every, *common),
            *("--set", "sampler.guide_at=0.5", "--set", "sampler.steps=8"),
        )
    )
    run_command(difflab_command("export", teacher, "--out", export))
    sampled = []
    for source, extra in [
        (export, ()),  # the export's own guide
        (teacher, ("--guide", list_checkpoints(teacher)[0], "--guidance", 2)),
    ]:
        out = folder / f"samples-{len(sampled)}"
        run_command(
            difflab_command("sample", source, "--num", 8, "--out", out, *extra, "--device", device)
        )
        sampled.append(len(list(out.glob("[0-9]*.png"))))
    steps = sizes.distill_steps
    distill = ("--out", student, "--steps", steps, "--checkpoint-every", steps // 2)
    dropout = ("--set", "network.unet.dropout=0.2")  # the target pass draws the online masks
    run_command(
        difflab_command("distill", teacher, *distill, "--batch-size", 32, *dropout, *common)
    )
    cooled = ("--steps", steps * 4 // 3, "--set", "train.lr_schedule='cooldown'")
    run_command(difflab_command("train", "--resume", student, *cooled, *common))
    for steps, start in ((1, ("--sigma-max", 10)), (2, ())):  # 1 step from sigma 10 (2.8)
        out = folder / f"student-{steps}"
        sample = ("sample", student, "--steps", steps, "--num", 8, "--out", out, *start)
        run_command(difflab_command(*sample, "--device", device))
        sampled.append(len(list(out.glob("[0-9]*.png"))))
    return {
        "student_checkpoints": [p.name for p in list_checkpoints(student)],
        "pngs": sampled,
    }
