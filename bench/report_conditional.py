"""bench/conditional.py's results as the "## Classes" section of docs/benchmarks.md."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

FIGURE = "bench-flow-cond.png"


def _best(rows: list[dict]) -> dict:
    """The guidance weight with the lowest KID (FID-1k breaks a tie)."""
    return min(rows, key=lambda row: (row["kid"], row["fid"]))


def section(values: dict, figures: Path) -> str:
    """The section from ``values`` (bench/results/conditional: ``sweep``, ``cars``, ``rates``);
    the class grid goes to (and, without the sweep's samples here, is found in) ``figures``."""
    sweep = values["sweep"]
    rows, best = sweep["rows"], _best(sweep["rows"])
    lines = [
        "## Classes",
        "",
        f"_Written by `bench/conditional.py report`; the sweep was measured {sweep['date']} on "
        f"{sweep['machine']}._",
        "",
        "Protocol (issue 15): `flow-cpu-cond` (flow-cpu with the ten CIFAR-10 classes as labels, "
        "label dropout 0.1) trains for "
        f"{sweep['train_minutes']:.1f} minutes on all 50,000 training images "
        "(`../shared/data/cifar10-jpg/train`), then samples 1,000 images, 100 per class "
        "(`--label all`), at each guidance weight w (D = D_uncond + w (D_cond - D_uncond); w = 1 "
        "is the plain conditional model). FID-1k and KID are measured against 5,000 training "
        "images, 500 per class; the 100 images that asked for `automobile` are also scored "
        "against the 5,000 training cars (KID only: FID at n = 100 means little).",
        "",
        "| guidance w | FID-1k (10 classes) | KID | KID of its 100 cars vs the cars | sampling img/s* |",
        "|---:|---:|---:|---:|---:|",
    ]
    measured = values.get("rates", {})
    rates = measured.get("images_per_s", {})
    for row in rows:
        mark = "**" if row is best else ""
        rate = rates.get(f"cond {row['guidance']}", math.nan)
        lines.append(
            f"| {mark}{row['guidance']:g}{mark} | {row['fid']:.1f} | {row['kid']:.4f} ± "
            f"{row['kid_std']:.4f} | {row['car_kid']:.4f} ± {row['car_kid_std']:.4f} | "
            f"{rate:.2f} |"
        )
    lines += [
        "",
        f"*Images/s of {measured.get('num', 0)} samples in-process after a warm-up, on this "
        f"CPU (`conditional.py rates`; fp32 matmul peak {measured.get('matmul_peak_gflops', 0):.0f}"
        " GFLOP/s measured just before); guidance other than 1 evaluates the network on a "
        f"doubled batch. The cars-only run samples {rates.get('cars', math.nan):.2f} img/s.",
        "",
        *_cars_lines(values, best),
        *_figure(best, figures),
    ]
    return "\n".join(lines) + "\n"


def _cars_lines(values: dict, best: dict) -> list[str]:
    cars = values.get("cars")
    if not cars:
        return ["The cars-only comparison is not measured yet (`bench/conditional.py cars`).", ""]
    small = cars["n100"]
    diff = best["car_kid"] - small["kid"]
    noise = (best["car_kid_std"] ** 2 + small["kid_std"] ** 2) ** 0.5
    verdict = (
        "within the subset noise of each other"
        if abs(diff) <= 2 * noise
        else ("worse for the shared network" if diff > 0 else "better for the shared network")
    )
    return [
        f"Cars alone, same budget: `flow-cpu` as it was before issue 14 (the conditional "
        "network's 64 channels, batch 32 and constant rate; `CARS_RECIPE` in conditional.py) "
        f"trained {cars['train_minutes']:.1f} minutes on the 5,000 training cars scores KID {small['kid']:.4f} ± {small['kid_std']:.4f} with 100 "
        f"samples against the training cars. The conditional network's 100 cars at w = {best['guidance']:g} score "
        f"KID {best['car_kid']:.4f} ± {best['car_kid_std']:.4f}: {verdict} (difference "
        f"{diff:+.4f}, subset std of the difference {noise:.4f}). The conditional network "
        "spent a tenth of its training images on cars.",
        "",
    ]


def _figure(best: dict, figures: Path) -> list[str]:
    grid, target = Path(best["folder"]) / "grid.png", figures / FIGURE
    if grid.exists():  # the sweep's samples are on this machine: the figure is their grid
        shutil.copyfile(grid, target)
    if not target.exists():  # elsewhere the figure that the measuring machine copied is shown
        return []
    return [
        f"![one row per class at w = {best['guidance']:g}](figures/{FIGURE})",
        "",
        f"One row per class (airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck; "
        f"8 samples each) at w = {best['guidance']:g}, from the sweep's samples.",
        "",
    ]
