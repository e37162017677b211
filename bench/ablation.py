"""Better cars per CPU-minute (issue 14): one lever at a time on flow-cpu, at the budgets of the
quality benchmark's machine, then FID-1k / KID of 1,000 samples against the 5,000 training cars.

A budget here is a number of images, not minutes: the images flow-cpu saw in 10 and 30 minutes on
the quality benchmark's machine (481 and 1,489 steps of 32 images; fp32 matmul peak 186
GFLOP/s). So quality does not depend on how busy or fast this machine is, and a lever that
costs more per image (a wider network) gets proportionally fewer images: ``speed`` measures
every lever's training seconds per image against flow-cpu's on this machine, in one run.

    python bench/ablation.py speed                  # seconds per image of every lever (quiet!)
    python bench/ablation.py run base cooldown      # train + evaluate at the 10-minute budget
    python bench/ablation.py run cooldown --budget 30
    python bench/ablation.py report                 # docs/benchmarks.md, "## Ablation"

Resumable: a finished piece is a JSON file in bench/results/ablation/ and is not redone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from quality_setup import DEFAULT_DATA, ROOT, machine, save

OUT = ROOT / "bench" / "out" / "ablation"
RESULTS = ROOT / "bench" / "results" / "ablation"
#: flow-cpu's steps of 32 images in 10 and 30 minutes on the quality benchmark's machine
#: (bench/results/quality: the 10-minute checkpoint and eval-flow.json).
BUDGET_STEPS = {10: 481, 30: 1489}
BASE_BATCH = 32


@dataclass(frozen=True)
class Lever:
    """One change to flow-cpu (``--set`` overrides on top of the levers it builds on)."""

    what: str
    sets: list[str] = field(default_factory=list)
    on: str = ""  # the lever this one changes further ("" = flow-cpu itself)
    sampler: list[str] = field(default_factory=list)  # eval options (sampling levers)

    def overrides(self) -> list[str]:
        return [*(LEVERS[self.on].overrides() if self.on else []), *self.sets]


COOL = ["train.lr_schedule='cooldown'", "train.min_lr=0"]
LEVERS: dict[str, Lever] = {
    "base": Lever("flow-cpu as shipped: Adam 1e-3 after 200 warm-up steps, EMA (ramp 0.05)"),
    "seed1": Lever("flow-cpu, training seed 1 (the spread of the base)", ["train.seed=1"]),
    "cooldown": Lever(
        "learning rate cools down linearly to 0 over the last 20% of the budget", COOL
    ),
    "cooldown50": Lever("... over the last 50%", ["train.cooldown=0.5"], on="cooldown"),
    "lr2e-3": Lever("cooldown, and peak learning rate 2e-3", ["train.lr=2e-3"], on="cooldown"),
    "no-ema": Lever(
        "cooldown, and no EMA (the cool-down averages)",
        ["train.ema_halflife_kimg=0"],
        on="cooldown",
    ),
    "ema-long": Lever(
        "cooldown, and an EMA ramp of 0.15 (3 times longer)",
        ["train.ema_rampup=0.15"],
        on="cooldown",
    ),
    "logit-normal": Lever(
        "cooldown, and logit-normal(0, 1) times (SD3) instead of EDM's log-normal",
        ["method.flow.time_distribution='logit-normal'"],
        on="cooldown",
    ),
}


def run_dir(name: str, budget: int) -> Path:
    return OUT / "runs" / f"{name}-{budget}"


def result_path(piece: str, name: str = "", budget: int = 0) -> Path:
    return RESULTS / (f"{piece}-{name}-{budget}.json" if name else f"{piece}.json")


def difflab(*args: object) -> None:
    import subprocess

    command = [sys.executable, "-m", "difflab", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"difflab {args[0]} failed")


# --------------------------------------------------------------------------- pieces


def images_for(name: str, budget: int) -> int:
    """The lever's images for a budget: the base's images times the base's cost per image over
    the lever's (1 for levers that do not change the network or the batch)."""
    images = BUDGET_STEPS[budget] * BASE_BATCH
    if not any(key in s for s in LEVERS[name].overrides() for key in ("network.", "batch_size")):
        return images
    speed = json.loads(result_path("speed").read_text())["seconds_per_image"]
    return round(images * speed["base"] / speed[name])


def piece_run(name: str, budget: int, data: str) -> None:
    path = result_path("eval", name, budget)
    if path.exists():
        return
    folder, images = run_dir(name, budget), images_for(name, budget)
    if (folder / "config.json").exists():
        difflab("train", "--resume", folder, "--no-progress")
    else:
        sets = [arg for s in LEVERS[name].overrides() for arg in ("--set", s)]
        difflab("train", "--preset", "flow-cpu", "--data", data, "--class", "automobile",
                "--out", folder, "--images", images, "--no-progress", *sets,
                "--set", "train.sample_every_kimg=0", "--set", "train.checkpoint_every=250")  # fmt: skip
    evaluated = OUT / "evals" / f"{name}-{budget}.json"
    if not evaluated.exists():
        difflab("eval", folder, "--ref", OUT / "ref-cars.npz", "--num", 1000, "--json", evaluated,
                *LEVERS[name].sampler)  # fmt: skip
    result = json.loads(evaluated.read_text())
    result.update(
        lever=name, budget_minutes=budget, images=images, overrides=LEVERS[name].overrides()
    )
    save(path, result)


def piece_speed() -> None:
    """Training seconds per image of every lever here, one after another on synthetic images;
    the matmul peak before and after. Run it alone: it is a timing."""
    import torch
    from common import matmul_peak, synthetic_images, time_steps, trainer_for

    torch.manual_seed(0)
    data, peaks, per_image = synthetic_images(256), [matmul_peak(10)], {}
    for name in LEVERS:
        with trainer_for("flow-cpu", data, LEVERS[name].overrides()) as trainer:
            time_steps(trainer, 5)  # warm-up
            seconds, images = min(time_steps(trainer, 20) for _ in range(3))
        per_image[name] = seconds / images
        print(f"{name}: {images / seconds:.1f} img/s", flush=True)
    peaks.append(matmul_peak(10))
    save(result_path("speed"), {"seconds_per_image": per_image, "matmul_gflops": peaks,
                                "torch_threads": torch.get_num_threads(), "cpu": machine()})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=("run", "speed", "report"))
    parser.add_argument("levers", nargs="*", help=f"of {', '.join(LEVERS)} (default: all)")
    parser.add_argument("--budget", type=int, choices=sorted(BUDGET_STEPS), default=10)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args()
    if unknown := set(args.levers) - set(LEVERS):
        parser.error(
            f"unknown lever(s) {', '.join(sorted(unknown))}; choose from {', '.join(LEVERS)}"
        )
    if args.piece == "speed":
        piece_speed()
    elif args.piece == "run":
        ref = OUT / "ref-cars.npz"
        if not ref.exists():
            difflab("ref", args.data, "--class", "automobile", "--out", ref)
        for name in args.levers or list(LEVERS):
            piece_run(name, args.budget, args.data)
    else:
        from report_ablation import write_report

        write_report()


if __name__ == "__main__":
    main()
