"""What the pieces of bench/quality.py share: the entries, the sampler sweep, the settings, running
the difflab command line, and recording a result.

Nothing here imports torch: ``python bench/quality.py --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg" / "train"


@dataclass(frozen=True)
class Entry:
    """One contender: a preset, optionally with another method or network."""

    preset: str
    method: str | None = None
    label: str = ""


ENTRIES = {
    "tutorial": Entry("tutorial", label="tutorial method + tutorial network (the notebook)"),
    "tutorial-unet": Entry("edm-cpu", method="tutorial", label="tutorial method + CPU U-Net"),
    "ddpm": Entry("ddpm-cpu", label="DDPM eps, linear + CPU U-Net"),
    "ddpm-cosine": Entry("ddpm-cosine-cpu", label="DDPM v, cosine + CPU U-Net"),
    "flow": Entry("flow-cpu", label="flow matching + CPU U-Net"),
    "edm": Entry("edm-cpu", label="EDM + CPU U-Net"),
}
SAMPLER_SWEEP = {
    "edm": [
        ("edm", [3, 5, 9, 18, 50]),
        ("euler", [5, 10, 18, 35, 100]),
        ("dpm++2m", [5, 10, 18, 35]),
    ],
    "flow": [
        ("heun", [3, 5, 9, 18, 50]),
        ("euler", [5, 10, 18, 35, 100]),
        ("dpm++2m", [5, 10, 18, 35]),
    ],
    "ddpm": [
        ("ancestral", [10, 35, 100, 1000]),
        ("ddim", [5, 10, 18, 35, 100]),
        ("dpm++2m", [5, 10, 18, 35]),
    ],
    "ddpm-cosine": [
        ("ancestral", [10, 35, 100, 1000]),
        ("ddim", [5, 10, 18, 35, 100]),
        ("dpm++2m", [5, 10, 18, 35]),
    ],
}


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        data = Path(args.data)  # absolute: difflab runs in the checkout's root (ROOT)
        self.data = str(data.resolve() if data.exists() else data)
        self.minutes = 0.3 if args.quick else args.minutes
        self.chunks = 2 if args.quick else args.chunks
        self.num = 20 if args.quick else args.num
        self.curve_num = 10 if args.quick else args.curve_num
        self.max_minutes = args.max_minutes
        self.ref_num = 40 if args.quick else 0  # 0: all 5,000
        self.out = ROOT / "bench" / "out" / ("quick" if args.quick else "quality")
        self.results = (
            self.out / "results" if args.quick else ROOT / "bench" / "results" / "quality"
        )
        self.python = sys.executable

    @property
    def ref(self) -> Path:
        return self.out / "ref-cars.npz"

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def result(self, piece: str, name: str = "") -> Path:
        return self.results / (f"{piece}-{name}.json" if name else f"{piece}.json")


def difflab(settings: Settings, *args: object) -> str:
    """Run the difflab CLI; its stdout is returned, its progress bars pass through."""
    command = [settings.python, "-m", "difflab", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"difflab {args[0]} failed with exit code {done.returncode}")
    print(done.stdout, end="")
    return done.stdout


def save(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {**values, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    path.write_text(json.dumps(values, indent=2) + "\n")
    print(f"recorded {os.path.relpath(path, ROOT)}")


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"
