"""One prepared GPU check (issue 13): every path on CUDA, then training speed, in one deadline.

    python bench/gpu.py --data FOLDER [--results DIR] [--minutes 8] [--device cuda]
    python bench/gpu.py --render DIR/gpu.json [MORE.json]   # write the "## GPU" section here
                                                          # (a later run's rows merged in)

Needs only the checkout (``PYTHONPATH=src``) and a folder of images (class folders named as
CIFAR-10's, e.g. 500 of each class, so the ``-cond`` presets learn classes); never the Inception
weights. In order, each part skipped with a note once the deadline is near:

1. Paths: every preset trains a few steps through ``difflab.train`` with a preview (pictures,
   strips, GIF, checkpoints, EMA), then samples with every sampler its method allows.
2. The command line on ``flow-cpu`` (the README's main job): ``train``, ``kill -9`` after the
   first checkpoint and ``--resume``, ``sample --strip --gif``, ``torchrun --nproc_per_node=1``,
   and eval's sampling half (1,000 images through ``Run.generate``) into ``samples.tar``, which
   ``difflab eval`` scores on the CPU afterwards.
3. Few-step (``fewstep``): a run keeping its own guide, exported and sampled with it;
   autoguidance by a named checkpoint; ``distill`` from the guided teacher; the student resumed
   into a cool-down and sampled at 1 and 2 steps.
4. Speed: first the paper-size U-Net's levers (``gpu_levers.py``: batch 512 or 1024, compiled
   or eager, channels_last, foreach instead of fused Adam, CUDA graphs, the attention's heads);
   then every preset eager in bf16 and fp32; then the slow compiles (max-autotune, batch 128,
   the small presets). Images/s, achieved TFLOP/s and the fraction of the bf16 matmul peak
   measured in the same run. With the ``profile`` part, the base of the levers (or every row
   named by ``--rows``) is profiled too: its step's GPU time by kernel family (convolutions,
   cuDNN's layout copies, Triton's fused kernels, ...) and its costliest kernels.

Results land in ``DIR/gpu.json`` after every measurement (a run cut short keeps what it has);
``report_gpu.py`` turns them into the ``## GPU`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpu_checks as checks
import torch
from common import (
    BACKWARD_FACTOR,
    BENCHMARKS,
    ROOT,
    first_line,
    machine_info,
    matmul_peak,
    time_steps,
    trainer_for,
)
from gpu_levers import LEVERS, applied
from gpu_profile import kernel_shares
from report_gpu import by_card, write_report

from difflab.config import load_preset, preset_names
from difflab.data import ImageSet, load_images
from difflab.devices import BF16_MIN_GFLOP_PER_STEP, compiled_layout
from difflab.models import count_parameters, forward_gflops
from difflab.registry import build_network

PRECISIONS = ("bf16", "fp32")
PAPER = "edm-paper"  # the paper-size U-Net whose speed target is 35% of the bf16 peak
PROFILED = f"{PAPER}, batch 512, compiled"  # the base of the levers


class Deadline:
    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + minutes * 60

    def left(self) -> float:
        return self.end - time.monotonic()


class Results:
    """The JSON file, rewritten after every measurement."""

    def __init__(self, folder: Path, values: dict[str, Any]) -> None:
        self.path, self.values = folder / "gpu.json", values
        folder.mkdir(parents=True, exist_ok=True)
        self.save()

    def add(self, part: str, row: dict[str, Any]) -> None:
        self.values.setdefault(part, []).append(row)
        self.save()
        print(json.dumps({part: row}), flush=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.values, indent=2) + "\n")


def attempt(results: Results, part: str, name: str, fn: Callable[[], dict]) -> None:
    """Run one check; a failure is a result too (its first line), never the end of the run."""
    start = time.monotonic()
    try:
        row = {"name": name, "ok": True, **fn()}
    except Exception as error:  # report and go on: the point is to see every path
        row = {"name": name, "ok": False, "error": first_line(error)}
    row["seconds"] = round(time.monotonic() - start, 1)
    results.add(part, row)


# --------------------------------------------------------------------------- 3. speed


def speed(
    preset: str,
    overrides: list[str],
    data: ImageSet,
    device: torch.device,
    peak_tflops: float,
    seconds: float = 3.0,
    profile: bool = False,
) -> dict:
    """Images/s of ``Trainer.train_step`` (first step timed apart: it compiles); with
    ``profile``, also where a step's GPU time goes (``kernel_shares``). ``overrides`` are
    config values and the options of gpu_levers.applied."""
    with (
        applied(overrides) as (overrides, lever),
        trainer_for(preset, data, overrides, device) as tr,
    ):
        first, _first_images = time_steps(tr, 1)
        warm, _warm_images = time_steps(tr, 2)
        count = int(min(max(seconds / (warm / 2), 5), 300))
        timed_s, images = time_steps(tr, count)
        t = tr.config.train
        gflop = forward_gflops(tr.net, 3, tr.config.data.image_size)
        rate = images / timed_s
        tflops = rate * BACKWARD_FACTOR * gflop / 1000
        return {
            "preset": preset,
            "batch": t.batch_size,
            "precision": t.precision,
            "autocast": str(tr.autocast).replace("torch.", ""),
            "compile": t.compile,
            "compile_mode": t.compile_mode,
            "compile_layout": compiled_layout(t.compile_layout, tr.device),
            **lever,
            "channels_last": t.channels_last,
            "fused_optimizer": t.fused_optimizer,
            "parameters": count_parameters(tr.net),
            "forward_gflop": gflop,
            "steps": count,
            "images_per_s": rate,
            "tflops": tflops,
            "fraction_of_bf16_peak": tflops / peak_tflops,
            "first_step_s": first,
            "compile_s": max(first - timed_s / count, 0.0),
            "peak_memory_gib": peak_memory_gib(tr.device),
            **({"kernels": kernel_shares(tr)} if profile else {}),
        }


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return gib


def auto_picks_bf16(preset: str) -> bool:
    """Whether ``precision = "auto"`` trains ``preset`` in bf16 on one GPU."""
    config = load_preset(preset)
    gflop = forward_gflops(build_network(config), 3, config.data.image_size)
    return gflop * config.train.batch_size >= BF16_MIN_GFLOP_PER_STEP


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a folder of images (e.g. the 5,000 cars)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--minutes", type=float, default=8.0, help="deadline for everything")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a CPU smoke test: tiny budgets")
    parser.add_argument("--presets", help="comma-separated presets (default: all)")
    parser.add_argument(
        "--parts",
        default="paths,cli,fewstep,speed,profile",
        help="comma-separated parts: paths, cli, fewstep, speed, profile",
    )
    parser.add_argument(
        "--scored", type=Path, metavar="EVAL_JSON", help="with --render: eval of samples.tar"
    )
    parser.add_argument("--rows", help="only these speed rows (names separated by ';')")
    parser.add_argument(
        "--render", type=Path, nargs="+", metavar="GPU_JSON", help="only write the section"
    )
    return parser.parse_args(argv)


def check_paths(
    results: Results, args: argparse.Namespace, parts: set[str], data: ImageSet, work: Path
) -> None:
    """Parts 1 to 3: every preset's paths, the command line on flow-cpu, the few-step paths."""
    device, deadline = torch.device(args.device), args.deadline
    sizes = checks.Sizes(20, 10, 10, 20, 6) if args.quick else checks.Sizes()
    for preset in args.presets if "paths" in parts else []:
        if deadline.left() < 0.75 * 60 * args.minutes:
            results.add("skipped", {"name": f"paths of {preset} and the presets after it"})
            break
        attempt(
            results, "paths", preset, lambda p=preset: checks.preset_paths(p, data, device, work)
        )
    if "cli" in parts and deadline.left() < 0.55 * 60 * args.minutes:
        results.add("skipped", {"name": "the command-line checks"})
    elif "cli" in parts:
        check_command_line(results, args, work, sizes)
    if "fewstep" in parts and deadline.left() < 0.4 * 60 * args.minutes:
        results.add("skipped", {"name": "the few-step checks"})
    elif "fewstep" in parts:
        attempt(
            results,
            "fewstep",
            "distill, autoguidance, export, cool-down",
            lambda: checks.fewstep_paths(args.data, work / "fewstep", args.device, sizes),
        )


def check_command_line(
    results: Results, args: argparse.Namespace, work: Path, sizes: checks.Sizes
) -> None:
    """Part 2: the README's main job through the command line."""
    device = torch.device(args.device)
    run_dir, tar = work / "cli", args.results / "samples.tar"
    attempt(
        results,
        "cli",
        "train, kill -9, resume",
        lambda: checks.train_kill_resume(args.data, run_dir, args.device, sizes),
    )
    attempt(
        results,
        "cli",
        "sample --strip --gif",
        lambda: checks.sample_strip_gif(run_dir, work / "samples", args.device),
    )
    attempt(
        results,
        "cli",
        "eval's sampling half",
        lambda: checks.eval_sampling_half(run_dir, tar, device, sizes.samples),
    )
    attempt(
        results,
        "cli",
        "torchrun --nproc_per_node=1",
        lambda: checks.torchrun_one_process(args.data, work / "torchrun", sizes),
    )


def speed_table(presets: list[str], quick: bool) -> list[tuple[str, str, list[str]]]:
    """(row name, preset, overrides) in the order they are measured: the paper-size U-Net's
    levers first (the speed target), then every preset eager in bf16 and fp32 (what
    ``precision = "auto"`` should pick), then the slow compiles (max-autotune, batch 128, the
    small presets)."""
    eager = [(f"{p}, {q}", p, [f"train.precision={q!r}"]) for p in presets for q in PRECISIONS]
    if quick:  # compiling takes minutes on a CPU
        return eager
    levers = [(f"{PAPER}, {label}", PAPER, overrides) for label, overrides in LEVERS]
    first = [(f"{PAPER}, bf16", PAPER, ["train.precision='bf16'"]), *levers[:-1]]
    last = [levers[-1], (f"{PAPER}, compiled", PAPER, ["train.compile=true"])]
    last += [(f"{p}, compiled", p, ["train.compile=true"]) for p in ("flow-cpu", "tutorial")]
    return [*first, *(row for row in eager if row[0] != first[0][0]), *last]


def measure_speed(results: Results, args: argparse.Namespace, data: ImageSet, peak: float) -> None:
    """Part 4: the rows of ``speed_table``, each skipped once the deadline is near; with the
    ``profile`` part, the base of the levers is profiled too."""
    seconds, device = (0.5 if args.quick else 3.0), torch.device(args.device)
    rows = speed_table(args.presets, args.quick)
    if args.rows:  # e.g. the rows a first run had to skip
        rows = [row for row in rows if row[0] in args.rows.split(";")]
    for name, preset, overrides in rows:
        if args.deadline.left() < (100 if "train.compile=true" in overrides else 20):
            results.add("skipped", {"name": f"speed of {name}"})
            continue
        attempt(
            results,
            "speed",
            name,
            lambda p=preset, o=overrides, n=name: speed(
                p,
                o,
                data,
                device,
                peak,
                seconds,
                profile=args.profile and (n == PROFILED or bool(args.rows)),
            ),
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next row starts with the card's memory free


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    if args.render:
        cards = by_card([json.loads(path.read_text()) for path in args.render])
        if args.scored:  # ``difflab eval samples --json`` of the first card's samples.tar
            cards[0]["scored"] = json.loads(args.scored.read_text())
        print(f"wrote {write_report(cards)}")
        return 0
    if args.data is None:
        raise SystemExit("--data FOLDER is needed (a folder of images, e.g. the 5,000 cars)")
    args.deadline, device = Deadline(args.minutes), torch.device(args.device)
    args.presets = args.presets.split(",") if args.presets else preset_names()
    parts = set(args.parts.split(","))
    args.profile = "profile" in parts
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    reps, size = (3, 1024) if args.quick else (10, 8192)
    peak = matmul_peak(reps, size, device, torch.bfloat16) / 1000
    info = {
        "peak_matmul": f"{size} x {size} `torch.mm`, best of {reps}",
        "device": str(device),
        **machine_info(argv),
        "card": card,
        "cuda": torch.version.cuda,
        "bf16_peak_tflops": peak,
        "minutes": args.minutes,
    }
    results = Results(args.results, {"machine": info})
    data = load_images(str(args.data), None, 32)
    with tempfile.TemporaryDirectory(prefix="difflab-gpu-") as work:
        if parts & {"paths", "cli", "fewstep"}:
            check_paths(results, args, parts, data, Path(work))
        if "speed" in parts:
            measure_speed(results, args, data, peak)
    results.values["auto_bf16"] = {p: auto_picks_bf16(p) for p in args.presets}
    results.save()
    doc = args.results / "benchmarks.md" if args.quick else BENCHMARKS
    with contextlib.suppress(OSError):  # the checkout may be read-only on the GPU machine
        print(f"wrote {write_report([results.values], doc)}")
    print(f"results in {results.path}; {args.deadline.left():.0f} s of the deadline left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
