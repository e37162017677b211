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
    on: str = "base"  # the lever this one changes further
    sampler: list[str] = field(default_factory=list)  # eval options (sampling levers)

    def overrides(self) -> list[str]:
        return [*(LEVERS[self.on].overrides() if self.on else []), *self.sets]


COOL = ["train.lr_schedule='cooldown'", "train.min_lr=0"]
LEVERS: dict[str, Lever] = {
    # flow-cpu as it was when issue 14 was filed, pinned: the preset may move to the winner.
    "base": Lever(
        "flow-cpu before issue 14: Adam 1e-3 after 200 warm-up steps, constant, EMA (ramp 0.05)",
        [
            "train.lr=1e-3",
            "train.warmup_steps=200",
            "train.lr_schedule='constant'",
            "train.batch_size=32",
            "train.ema_halflife_kimg=500",
            "train.ema_rampup=0.05",
            "network.unet.attention_resolutions=[]",
            "method.flow.time_distribution='log-normal'",
            "sampler.guide_at=0",
            "sampler.guidance=1",
        ],
        on="",
    ),
    "seed1": Lever("training seed 1 instead of 0 (the spread of the base)", ["train.seed=1"]),
    "cooldown": Lever(
        "learning rate cools down linearly to 0 over the last 20% of the budget", COOL, on="base"
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
    "batch16": Lever(
        "cooldown, and batches of 16 (twice the steps for the same images)",
        ["train.batch_size=16"],
        on="cooldown",
    ),
    "attn8": Lever(
        "cooldown, and self-attention at 8x8 (and in the middle, as before)",
        ["network.unet.attention_resolutions=[8]"],
        on="cooldown",
    ),
    "ch48": Lever(
        "cooldown, and a narrower U-Net: 48 base channels instead of 64 (more images)",
        ["network.unet.channels=48"],
        on="cooldown",
    ),
    "ch32": Lever(
        "cooldown, and 32 base channels (more images still)",
        ["network.unet.channels=32"],
        on="cooldown",
    ),
    "warmup50": Lever(
        "cooldown, and 50 warm-up steps instead of 200 (of 481 at 10 minutes)",
        ["train.warmup_steps=50"],
        on="cooldown",
    ),
    "beta2": Lever(
        "cooldown, and Adam beta2 0.99 instead of 0.999 (a shorter memory of gradient scale)",
        ["train.betas=[0.9, 0.99]"],
        on="cooldown",
    ),
    "ch48-b16": Lever("48 channels and batches of 16", ["train.batch_size=16"], on="ch48"),
    "ch32-b16": Lever("32 channels and batches of 16", ["train.batch_size=16"], on="ch32"),
    "heun9": Lever(
        "the ch32-b16 run sampled with Heun in 9 steps (17 evaluations) instead of 18 (35)",
        on="ch32-b16",
        sampler=["--steps", "9"],
    ),
    "heun25": Lever(
        "the ch32-b16 run sampled with Heun in 25 steps (49 evaluations) instead of 18 (35)",
        on="ch32-b16",
        sampler=["--steps", "25"],
    ),
    "heun25-48": Lever(
        "the ch48-b16 run sampled with Heun in 25 steps (49 evaluations) instead of 18 (35)",
        on="ch48-b16",
        sampler=["--steps", "25"],
    ),
    "b16-seed1": Lever(
        "ch32-b16 with training seed 1 (its seed spread)", ["train.seed=1"], "ch32-b16"
    ),
    "b16-lr2e-3": Lever("ch32-b16 with peak learning rate 2e-3", ["train.lr=2e-3"], "ch32-b16"),
    "b16-no-ema": Lever("ch32-b16 without EMA", ["train.ema_halflife_kimg=0"], "ch32-b16"),
    "b16-ema-long": Lever(
        "ch32-b16 with an EMA ramp of 0.15 (3 times longer)", ["train.ema_rampup=0.15"], "ch32-b16"
    ),
    "b16-logit": Lever(
        "ch32-b16 with logit-normal(0, 1) times (SD3) instead of EDM's log-normal",
        ["method.flow.time_distribution='logit-normal'"],
        "ch32-b16",
    ),
    # Autoguidance (Karras et al. 2024): the run guided away from its own EMA weights at a
    # quarter of its steps (kept by the trainer), w = 2; snapshots every 250 steps (they change
    # no weights) let the sampling levers below guide by other steps of the same run.
    "ag": Lever(
        "ch32-b16 sampled with autoguidance: guide = its own EMA at 25% of the steps, w = 2",
        ["sampler.guide_at=0.25", "sampler.guidance=2", "train.snapshot_every=250"],
        "ch32-b16",
    ),
    **{
        f"ag-w{w}": Lever(f"ag with w = {w}", on="ag", sampler=["--guidance", w])
        for w in ("1.5", "2.5")
    },
    "ag-seed1": Lever("ag with training seed 1 (b16-seed1, autoguided)", ["train.seed=1"], "ag"),
    "ag-heun9": Lever(
        "ag sampled with Heun in 9 steps: 34 evaluations, the unguided run's cost",
        on="ag",
        sampler=["--steps", "9"],
    ),
    **{
        f"ag-g{step}": Lever(
            f"ag guided by the EMA at step {step} of 3,052 (10-minute budget)",
            on="ag",
            sampler=["--guide", f"{{run}}/checkpoints/step-{step:08d}"],
        )
        for step in (250, 1500)
    },
    "ag-48": Lever(
        "the ch48-b16 run with ag's autoguidance (guide at 25%, w = 2)",
        ["sampler.guide_at=0.25", "sampler.guidance=2"],
        "ch48-b16",
    ),
    "logit-normal": Lever(
        "cooldown, and logit-normal(0, 1) times (SD3) instead of EDM's log-normal",
        ["method.flow.time_distribution='logit-normal'"],
        on="cooldown",
    ),
}


def trained_by(name: str) -> str:
    """The lever whose run ``name`` evaluates: a sampling lever (no settings of its own)
    evaluates the run of the lever it builds on."""
    lever = LEVERS[name]
    return lever.on if lever.sampler and not lever.sets else name


def run_dir(name: str, budget: int) -> Path:
    return OUT / "runs" / f"{trained_by(name)}-{budget}"


def result_path(piece: str, name: str = "", budget: int = 0) -> Path:
    return RESULTS / (f"{piece}-{name}-{budget}.json" if name else f"{piece}.json")


def difflab(*args: object) -> None:
    import subprocess

    command = [sys.executable, "-m", "difflab", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"difflab {args[0]} failed")


# --------------------------------------------------------------------------- pieces


def _prices(sets: list[str]) -> bool:
    return any(key in s for s in sets for key in ("network.", "batch_size"))


def costs_more(name: str) -> bool:
    """Whether the lever may change the cost of an image (its network or its batch)."""
    return _prices(list(set(LEVERS[name].overrides()) - set(LEVERS["base"].sets)))


def priced_by(name: str) -> str:
    """The lever whose cost per image this one has: itself if its own settings change the
    network or the batch, else the lever it builds on."""
    lever = LEVERS[name]
    return name if not lever.on or _prices(lever.sets) else priced_by(lever.on)


def images_for(name: str, budget: int) -> int:
    """The lever's images for a budget: the base's images times the base's cost per image over
    the lever's (the same images for levers that change neither the network nor the batch)."""
    images, name = BUDGET_STEPS[budget] * BASE_BATCH, trained_by(name)
    if not costs_more(name):
        return images
    speed = json.loads(result_path("speed").read_text())["seconds_per_image"]
    return round(images * speed["base"] / speed[priced_by(name)])


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
        sampler = [str(arg).format(run=folder) for arg in LEVERS[name].sampler]
        difflab("eval", folder, "--ref", OUT / "ref-cars.npz", "--num", 1000, "--json", evaluated,
                *sampler)  # fmt: skip
    from difflab.train.checkpoint import latest_checkpoint

    result = json.loads(evaluated.read_text())
    result["train_minutes"] = latest_checkpoint(folder).state["elapsed"] / 60  # on this machine
    result.update(
        lever=name, budget_minutes=budget, images=images, overrides=LEVERS[name].overrides()
    )
    save(path, result)


def piece_speed() -> None:
    """Training seconds per image of the base and of every lever that may change it, one after
    another on synthetic images; the matmul peak before and after. Run it alone: a timing."""
    import torch
    from common import matmul_peak, synthetic_images, time_steps, trainer_for

    path = result_path("speed")
    known = json.loads(path.read_text()) if path.exists() else {"seconds_per_image": {}}
    priced = [name for name in filter(costs_more, LEVERS) if priced_by(name) == name]
    todo = [name for name in priced if name not in known["seconds_per_image"]]
    torch.manual_seed(0)
    data, peaks, measured = synthetic_images(256), [matmul_peak(10)], {}
    for name in ["base", *todo]:
        with trainer_for("flow-cpu", data, LEVERS[name].overrides()) as trainer:
            time_steps(trainer, 5)  # warm-up
            seconds, images = min(time_steps(trainer, 20) for _ in range(3))
        measured[name] = seconds / images
        print(f"{name}: {images / seconds:.1f} img/s", flush=True)
    peaks.append(matmul_peak(10))
    # Levers measured later keep their cost relative to the base timed beside them.
    base = known["seconds_per_image"].get("base", measured["base"])
    per_image = {**{k: v * base / measured["base"] for k, v in measured.items()},
                 **known["seconds_per_image"]}  # fmt: skip
    save(path, {"seconds_per_image": per_image, "torch_threads": torch.get_num_threads(),
                "matmul_gflops": known.get("matmul_gflops", []) + peaks, "cpu": machine()})  # fmt: skip


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
