"""What every benchmark shares: the machine's facts, timing, a trainer to time, and one way to
rewrite a section of docs/benchmarks.md.

Benchmarks are users of the library: they time ``Trainer.train_step()`` and
``difflab.sampling.generate``, never a copy of them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import resource
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.config import apply_overrides, load_preset
from difflab.data import ImageSet
from difflab.devices import cpu_model
from difflab.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
DOC_TITLE = "# Benchmarks"
BACKWARD_FACTOR = 3.0  # forward + backward ~ 3 forwards (backward ~ 2: grads of inputs and weights)

# Pictures, checkpoints and log rows off: only the optimizer step is timed.
QUIET = [
    "train.sample_every_kimg=0",
    "train.checkpoint_every=1000000000",
    "train.log_every=1000000000",
]


# --------------------------------------------------------------------------- the machine


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def machine_info(argv: list[str]) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", *argv]),
        "load_start": load_average(),
    }


@dataclass(frozen=True)
class CpuClock:
    """CPU seconds at one moment: the machine's busy time and this process's own share."""

    wall: float
    busy: float  # all processes (user + nice + system + irq + softirq)
    own: float  # this process and its finished children (the compiler)
    steal: float  # taken by the hypervisor for other virtual machines

    @classmethod
    def now(cls) -> CpuClock:
        tick = os.sysconf("SC_CLK_TCK")
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        except (OSError, ValueError):
            fields = [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        own = sum(
            usage.ru_utime + usage.ru_stime
            for usage in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        busy = (user + nice + system + irq + softirq) / tick
        return cls(time.monotonic(), busy, own, steal / tick)


def others_since(start: CpuClock) -> dict[str, float]:
    """Cores that other processes (and other VMs: steal) kept busy on average since ``start``.

    The load average cannot tell: it counts this benchmark's own threads too.
    """
    end = CpuClock.now()
    wall = max(end.wall - start.wall, 1e-9)
    others = max((end.busy - start.busy) - (end.own - start.own), 0.0)
    return {
        "other_cores": round(others / wall, 3),
        "steal_cores": round((end.steal - start.steal) / wall, 3),
        "seconds": round(wall, 1),
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queue: a timer that stops earlier measures the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    reps: int,
    size: int = 2048,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Best GFLOP/s of a ``size`` x ``size`` ``torch.mm`` (2 n^3 FLOP) on ``device``."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm up
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(reps))
    return 2 * size**3 / best / 1e9


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall seconds of ``fn()``, the device's queue drained before and after."""
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        synchronize(device)
    return time.perf_counter() - start


def summarize(seconds: list[float], images: list[int]) -> dict[str, Any]:
    """Images/s from the median step (robust to other jobs' bursts) and from the total."""
    rates = [n / s for n, s in zip(images, seconds, strict=True)]
    return {
        "images_per_s": statistics.median(rates),
        "images_per_s_mean": sum(images) / sum(seconds),
        "median_step_s": statistics.median(seconds),
        "steps": len(seconds),
        "step_s": [round(s, 4) for s in seconds],
    }


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()[:300]


# --------------------------------------------------------------------------- a trainer to time


def synthetic_images(count: int, size: int = 32, seed: int = 0) -> ImageSet:
    """``count`` random uint8 RGB images (one class): speed does not depend on pixel values."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, size, size), generator=gen, dtype=torch.uint8)
    return ImageSet(images, torch.zeros(count, dtype=torch.int64), [], f"synthetic ({count})")


@contextlib.contextmanager
def trainer_for(
    preset: str,
    data: ImageSet,
    overrides: list[str],
    device: torch.device | str = "cpu",
) -> Iterator[Trainer]:
    """A quiet ``Trainer`` of ``preset`` on a temporary run directory, closed afterwards."""
    config = apply_overrides(load_preset(preset), [*QUIET, *overrides])
    with tempfile.TemporaryDirectory(prefix="difflab-bench-") as folder:
        trainer = Trainer(config, Path(folder) / "run", data=data, device=torch.device(device))
        with trainer:
            try:
                yield trainer
            finally:
                if config.train.compile:
                    torch._dynamo.reset()


def time_steps(trainer: Trainer, count: int) -> tuple[float, int]:
    """(seconds, images) of ``count`` optimizer steps, the device's queue drained at both ends
    and the steps' losses read back (checked) once at the end, as the training loop does."""
    start_images = trainer.images_seen
    synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(count):
        trainer.train_step()
    trainer.read_back()
    seconds = time.perf_counter() - start
    return seconds, trainer.images_seen - start_images


# --------------------------------------------------------------------------- docs/benchmarks.md


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the ``heading`` section (up to the next ``## ``) replaced by ``body``."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + rest if rest else "")


def write_section(heading: str, body: str, path: Path = BENCHMARKS) -> Path:
    """Replace (or append) the ``heading`` section of ``path``; other sections are kept."""
    if path.exists():
        text = path.read_text()
    else:
        text = f"{DOC_TITLE}\n\nSpeed and sample quality of difflab, one `##` section each.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, heading, body.rstrip("\n") + "\n"))
    return path
