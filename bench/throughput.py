"""Speed benchmarks on CPU: training and sampling images/s (issues 2 and 4).

    python bench/throughput.py [--quick] [--out docs/benchmarks.md] [--wait-idle MINUTES]
    python bench/throughput.py --profile    # top operators of one bare and one difflab step
    python bench/throughput.py --render     # rewrite the Markdown from the JSON

1. The tutorial network at batch 128: a bare PyTorch loop written like the tutorial's notebook
   against difflab's own ``Trainer.train_step`` on the same synthetic data (the trainer overhead),
   the tutorial's 16-step sampling loop against ``difflab.sampling.generate``, achieved GFLOP/s
   and the fraction of the machine's measured float32 matmul peak.
2. Every network at its CPU-preset batch size, with and without ``channels_last`` and
   ``torch.compile`` (failures are reported with the first line of their error).

This script measures and writes the results as JSON to ``bench/results/throughput.json``;
``bench/report_speed.py`` turns them into the ``## Speed`` section of ``--out`` (other sections
are kept). Synthetic random images are used: speed does not depend on pixel values, and no
download is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import report_speed
from common import (
    BENCHMARKS,
    ROOT,
    CpuClock,
    first_line,
    load_average,
    machine_info,
    matmul_peak,
    others_since,
    summarize,
    synthetic_images,
    timed,
    trainer_for,
)
from report_speed import MATMUL_SIZE, NUM_IMAGES, fmt
from speed_tutorial import (
    CHANNELS,
    IMAGE_SIZE,
    profile_tutorial,
    timed_step,
    trainer_step,
    tutorial_benchmark,
)

from difflab.config import apply_overrides, load_preset
from difflab.data import ImageSet
from difflab.models import count_parameters, forward_gflops
from difflab.registry import build_network
from difflab.train.trainer import Trainer

JSON_PATH = ROOT / "bench" / "results" / "throughput.json"
IDLE_CORES = 0.1  # --wait-idle waits until other processes use fewer cores than this

# (label, preset, overrides): the networks of issue 4 at their CPU-preset batch sizes.
NETWORKS: list[tuple[str, str, list[str]]] = [
    ("tutorial", "tutorial", []),
    ("tutorial-keras", "tutorial-keras", []),
    ("unet (edm-cpu)", "edm-cpu", []),
    ("unet (edm-paper, 35.7M)", "edm-paper", ["train.batch_size=8"]),
]
VARIANTS: list[tuple[str, list[str]]] = [
    ("eager", []),
    ("channels_last", ["train.channels_last=true"]),
    ("compile", ["train.compile=true"]),
    ("compile + channels_last", ["train.compile=true", "train.channels_last=true"]),
]


@dataclass(frozen=True)
class Plan:
    """How many repetitions each measurement gets."""

    warmup: int  # untimed steps before timing (the first also compiles)
    steps: int  # timed steps per loop in the tutorial comparison
    sample_reps: int  # timed 16-step sampling runs of a full batch, per loop
    matmul_reps: int
    variant_seconds: float  # target timed seconds per (network, variant)
    variant_min: int  # timed steps per (network, variant), at least ...
    variant_max: int  # ... and at most


FULL = Plan(3, 6, 2, 10, variant_seconds=25, variant_min=3, variant_max=8)
QUICK = Plan(1, 2, 1, 5, variant_seconds=5, variant_min=1, variant_max=2)


# --------------------------------------------------------------------------- issue 4


def warm_up(trainer: Trainer, plan: Plan) -> dict[str, Any]:
    """The first step (which compiles, if asked) timed apart, then the warm-up steps."""
    first = timed(lambda: trainer_step(trainer))
    warm = [timed(lambda: trainer_step(trainer)) for _ in range(max(plan.warmup - 1, 1))]
    return {"first_step_s": first, "warm_step_s": warm}


def start_variants(
    stack: contextlib.ExitStack, preset: str, overrides: list[str], data: ImageSet, plan: Plan
) -> tuple[dict[str, Trainer], dict[str, dict[str, Any]]]:
    """A warmed-up trainer per variant that works; a failure record per variant that does not."""
    live, results = {}, {}
    for name, extra in VARIANTS:
        try:
            trainer = stack.enter_context(trainer_for(preset, data, [*overrides, *extra], "cpu"))
            results[name] = {"status": "ok", **warm_up(trainer, plan)}
            live[name] = trainer
        except Exception as error:  # compile on CPU can fail in many ways; report, go on
            results[name] = {"status": "failed", "error": first_line(error)}
    return live, results


def round_robin(live: dict[str, Trainer], warm: dict[str, dict], plan: Plan) -> dict[str, dict]:
    """Timed steps of all variants in turn (rotating order): drifting load hits each alike."""
    fastest = [warm[name]["warm_step_s"][-1] for name in live]
    count = round(plan.variant_seconds / max(statistics.median(fastest), 1e-3)) if live else 0
    count = min(max(count, plan.variant_min), plan.variant_max)
    names = list(live)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    sizes: dict[str, list[int]] = {name: [] for name in names}
    for k in range(count):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            step_s, images = timed_step(lambda name=name: trainer_step(live[name]))
            seconds[name].append(step_s)
            sizes[name].append(images)
    return {name: summarize(seconds[name], sizes[name]) for name in names}


def measure_network(preset: str, overrides: list[str], data: ImageSet, plan: Plan) -> dict:
    with contextlib.ExitStack() as stack:
        live, results = start_variants(stack, preset, overrides, data, plan)
        for name, timing in round_robin(live, results, plan).items():
            results[name].update(timing)
            first = results[name]["first_step_s"]
            results[name]["compile_s"] = max(first - timing["median_step_s"], 0.0)
    return results


def network_facts(preset: str, overrides: list[str]) -> dict[str, Any]:
    config = apply_overrides(load_preset(preset), overrides)
    net = build_network(config)
    return {
        "preset": preset,
        "batch_size": config.train.batch_size,
        "parameters": count_parameters(net),
        "forward_gflop_per_image": forward_gflops(net, CHANNELS, IMAGE_SIZE),
    }


def networks_benchmark(data: ImageSet, plan: Plan, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for label, preset, overrides in NETWORKS:
        log(f"  {label}: {', '.join(name for name, _ in VARIANTS)}")
        clock = CpuClock.now()
        variants = measure_network(preset, overrides, data, plan)
        others = others_since(clock)
        log("    " + "; ".join(f"{k}: {describe_variant(v)}" for k, v in variants.items()))
        log(f"    others {others}")
        facts = network_facts(preset, overrides)
        rows.append({"network": label, **facts, "variants": variants, "others": others})
    return rows


# --------------------------------------------------------------------------- results


def describe_variant(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"failed ({result['error']})"
    return f"{fmt(result['images_per_s'])} img/s"


def write_json(results: dict[str, Any]) -> None:
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    parser.add_argument(
        "--out", type=Path, default=BENCHMARKS, help="the Markdown file (default: %(default)s)"
    )
    parser.add_argument("--skip-networks", action="store_true", help="only the tutorial part")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help=f"first wait up to MINUTES until other processes use under {IDLE_CORES} cores",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the top operators of one step and exit"
    )
    parser.add_argument(
        "--render", action="store_true", help=f"only rewrite --out from {JSON_PATH.name}"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {message}", flush=True)


def wait_for_idle(minutes: float, window_s: float = 20.0) -> float:
    """Wait until other processes use under ``IDLE_CORES`` over a window; seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < minutes * 60:
        clock = CpuClock.now()
        time.sleep(window_s)
        if others_since(clock)["other_cores"] < IDLE_CORES:
            break
    return time.monotonic() - start


def start_machine(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    if args.wait_idle > 0:
        log(f"waiting up to {args.wait_idle:g} min for other processes to go quiet")
    waited = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
    machine = {**machine_info(argv), "waited_for_idle_s": round(waited)}
    log(f"start: {machine['cpu']}, torch {machine['torch']}, {machine['torch_threads']} threads")
    return machine


def finish_machine(results: dict[str, Any], peak_start: float, reps: int) -> None:
    peak_end = matmul_peak(reps, MATMUL_SIZE)
    peak = max(peak_start, peak_end)
    results["machine"].update(
        load_end=load_average(),
        peak_start=peak_start,
        peak_end=peak_end,
        peak_gflops=peak,
        matmul_reps=reps,
    )
    refresh_fractions(results["tutorial"], peak)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    results: dict[str, Any] = {"machine": start_machine(args, argv), "plan": asdict(plan)}
    results["others"] = others = {}
    clock = CpuClock.now()
    peak_start = matmul_peak(plan.matmul_reps, MATMUL_SIZE)
    log(f"matmul peak {peak_start:.1f} GFLOP/s")
    data = synthetic_images(NUM_IMAGES, IMAGE_SIZE)
    log("issue 2: tutorial network, bare loop vs difflab")
    results["tutorial"] = tutorial_benchmark(data, plan, peak_start)
    others["tutorial"] = others_since(clock)
    log(f"  overhead {results['tutorial']['trainer_overhead']:+.1%}; others {others['tutorial']}")
    if not args.skip_networks:
        clock = CpuClock.now()
        log("issue 4: every network")
        results["networks"] = networks_benchmark(data, plan, log)
        others["networks"] = others_since(clock)
        log(f"  others {others['networks']}")
    finish_machine(results, peak_start, plan.matmul_reps)
    return results


def refresh_fractions(t: dict[str, Any], peak: float) -> None:
    """Fractions of the better of the two peak measurements."""
    t["flops"]["fraction_of_peak"] = t["flops"]["achieved_gflops"] / peak
    t["bare_fraction_of_peak"] = t["bare_achieved_gflops"] / peak


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    if args.profile:
        print(profile_tutorial(synthetic_images(NUM_IMAGES, IMAGE_SIZE)))
        return 0
    if args.render:
        report_speed.write(json.loads(JSON_PATH.read_text()), args.out)
        log(f"wrote {args.out} from {JSON_PATH}")
        return 0
    with tempfile.TemporaryDirectory(prefix="difflab-inductor-") as cache:
        # Cold compiles that leave nothing behind (importing difflab already set the default).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        results = run(args, argv)
    write_json(results)
    report_speed.write(results, args.out)
    log(f"wrote {args.out} and {JSON_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
