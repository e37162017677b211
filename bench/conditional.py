"""All ten CIFAR-10 classes with classifier-free guidance, against cars alone (issue 15).

Resumable pieces; every result lands in bench/results/conditional/*.json when measured (with
the training minutes of the run it measured), and ``report`` writes the "## Classes" section of
docs/benchmarks.md from those alone, on any machine.

    python bench/conditional.py ref       # statistics of 5,000 training images (500 per class)
                                          # and of the 5,000 training cars
    python bench/conditional.py train     # flow-cpu-cond, 30 minutes, all 50,000 images
    python bench/conditional.py sweep     # 1,000 samples (100 per class) at each w: FID-1k and
                                          # KID against the 10-class reference, and KID of the
                                          # 100 cars against the car reference
    python bench/conditional.py cars      # flow-cpu on the cars alone, same budget: KID of 100
                                          # samples against the car reference (same n)
    python bench/conditional.py rates     # sampling images/s of each, in-process, machine quiet
    python bench/conditional.py report
    python bench/conditional.py all       # every missing piece, in this order

Run nothing else heavy while ``train`` runs: the budget is wall-clock on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import quality
from common import BENCHMARKS, ROOT, matmul_peak, write_section
from quality_setup import DEFAULT_DATA, Settings, difflab, save

GUIDANCE = [1.0, 1.5, 2.0, 3.0]
PER_CLASS_REF = 500
CAR = "automobile"
#: The cars-only run: flow-cpu as it was when this section and bench/fewstep.py's teacher were
#: measured, before issue 14 made it smaller and autoguided (flow-cpu-cond's 64 channels, batch
#: 32, constant rate; sampled unguided), so that rerunning it reproduces them.
CARS_RECIPE = [
    "--preset", "flow-cpu", "--class", CAR,
    "--set", "network.unet.channels=64", "--set", "train.batch_size=32",
    "--set", "train.lr_schedule='constant'", "--set", "sampler.guide_at=0",
    "--set", "sampler.guidance=1",
]  # fmt: skip
HEADING = "## Classes"


def settings_for(args: argparse.Namespace) -> Settings:
    settings = Settings(args)
    name = "conditional-quick" if args.quick else "conditional"
    settings.out = ROOT / "bench" / "out" / name
    settings.results = settings.out / "results" if args.quick else ROOT / "bench" / "results" / name
    return settings


def ref_classes(settings: Settings) -> Path:
    return settings.out / "ref-classes.npz"


def piece_ref(settings: Settings) -> None:
    """500 (quick: 4) training images of each class, and quality.py's car reference."""
    quality.piece_ref(settings)
    if ref_classes(settings).exists():
        return
    folder, per_class = settings.out / "ref-images", 4 if settings.quick else PER_CLASS_REF
    for class_folder in sorted(Path(settings.data).iterdir()):
        target = folder / class_folder.name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(class_folder.iterdir())[:per_class]:
            if not (target / path.name).exists():
                os.symlink(path.resolve(), target / path.name)
    difflab(settings, "ref", folder, "--out", ref_classes(settings))


def piece_train(settings: Settings, name: str = "cond") -> None:
    """flow-cpu-cond on every class (``cond``), or flow-cpu on the cars (``cars``), in chunks."""
    run_dir, chunk = settings.run_dir(name), settings.minutes / settings.chunks
    while (done := quality._elapsed_minutes(run_dir)) < settings.minutes - 0.01:
        limit = min(chunk, settings.minutes - done)
        if (run_dir / "config.json").exists():
            difflab(settings, "train", "--resume", run_dir, "--time-limit", limit, "--no-progress")
            continue
        what = ["--preset", "flow-cpu-cond"] if name == "cond" else CARS_RECIPE
        difflab(
            settings, "train", *what, "--data", settings.data, "--out", run_dir,
            "--time-limit", limit, "--steps", 10**9, "--set", "train.keep_last=1000",
            "--set", "train.checkpoint_every=1000000000", "--set", "train.sample_every_kimg=0",
            "--no-progress",
        )  # fmt: skip


def _sample_and_score(settings: Settings, name: str, num: int, *extra: object) -> dict:
    """``difflab sample`` then ``difflab eval`` of the folder; seconds of each."""
    folder = settings.out / "samples" / f"{name}-{time.time_ns()}"
    started = time.monotonic()
    difflab(settings, "sample", settings.run_dir(name), "--num", num, "--out", folder, *extra)
    sample_s = time.monotonic() - started
    ref = ref_classes(settings) if name.startswith("cond") else settings.ref
    return {"folder": str(folder), "sample_seconds": sample_s, **_score(settings, folder, ref)}


def _score(settings: Settings, folder: Path, ref: Path) -> dict:
    out = folder.with_suffix(".json")
    difflab(settings, "eval", folder, "--ref", ref, "--json", out)
    result = json.loads(out.read_text())
    return {"fid": result["fid"], "kid": result["kid_mean"], "kid_std": result["kid_std"],
            "num": result["num_gen"]}  # fmt: skip


def _cars_of(folder: Path, classes: int, car_index: int) -> Path:
    """The images that asked for the car class (image i asks for class i mod C), linked."""
    cars = folder.with_name(folder.name + "-cars")
    cars.mkdir(exist_ok=True)
    for path in sorted(folder.glob("[0-9]*.png")):
        if int(path.stem) % classes == car_index and not (cars / path.name).exists():
            os.symlink(path.resolve(), cars / path.name)
    return cars


def piece_sweep(settings: Settings) -> None:
    results = settings.result("sweep")
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    names = json.loads((settings.run_dir("cond") / "config.json").read_text())["data"]
    classes = names["class_names"]
    for w in GUIDANCE:
        if any(row["guidance"] == w for row in rows):
            continue
        row = _sample_and_score(settings, "cond", settings.num, "--label", "all", "--guidance", w)
        cars = _cars_of(Path(row["folder"]), len(classes), classes.index(CAR))
        car = _score(settings, cars, settings.ref)
        rows.append({"guidance": w, **row, "car_kid": car["kid"], "car_kid_std": car["kid_std"],
                     "cars": car["num"]})  # fmt: skip
        # the run's training minutes, kept with what it measured: the report reads no run folder
        save(results, {"rows": sorted(rows, key=lambda r: r["guidance"]), "classes": classes,
                       "train_minutes": quality._elapsed_minutes(settings.run_dir("cond"))})  # fmt: skip


def piece_cars(settings: Settings) -> None:
    """The unconditional cars-only run at the same budget, scored at the same n as the cars of
    the conditional samples (100) against the car reference (bench/fewstep.py scores it at
    1,000 as its teacher)."""
    piece_train(settings, "cars")
    results = settings.result("cars")
    if results.exists():
        return
    save(results, {"n100": _sample_and_score(settings, "cars", settings.num // 10),
                   "train_minutes": quality._elapsed_minutes(settings.run_dir("cars"))})  # fmt: skip


def piece_rates(settings: Settings, num: int = 30) -> None:
    """Sampling images/s at each guidance weight and of the cars-only run, in-process after a
    warm-up (the sweep's own sampling may share the CPU with other work)."""
    from difflab.api import load_run

    results = settings.result("rates")
    if results.exists():
        return
    peak = matmul_peak(10)  # GFLOP/s of fp32 matmul, beside the speeds measured with it
    rates = {}
    for name, requests in (("cond", [{"label": "all", "guidance": w} for w in GUIDANCE]),
                           ("cars", [{}])):  # fmt: skip
        run = load_run(settings.run_dir(name), device="cpu")
        for request in requests:
            run.generate(10, **request)
            started = time.monotonic()
            run.generate(num, **request)
            rates[f"{name} {request.get('guidance', '')}".strip()] = num / (
                time.monotonic() - started
            )
    save(results, {"images_per_s": rates, "num": num, "matmul_peak_gflops": peak})


def report_values(settings: Settings) -> dict:
    """What ``report`` writes from: the results of the pieces, none of the run folders."""
    if not settings.result("sweep").exists():
        raise SystemExit("nothing measured yet: run the sweep first")
    values = {piece: json.loads(settings.result(piece).read_text())
              for piece in ("sweep", "cars", "rates") if settings.result(piece).exists()}  # fmt: skip
    for piece in ("sweep", "cars"):
        if piece in values and "train_minutes" not in values[piece]:
            raise SystemExit(
                f"{settings.result(piece)} has no train_minutes: `{piece}` records them"
            )
    return values


def _figures(settings: Settings) -> Path:
    return settings.out if settings.quick else ROOT / "docs" / "figures"


def piece_report(settings: Settings) -> None:
    from report_conditional import section

    text = section(report_values(settings), _figures(settings))
    target = settings.out / "benchmarks.md" if settings.quick else BENCHMARKS
    print(f"wrote {write_section(HEADING, text, target)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "piece", choices=["ref", "train", "sweep", "cars", "rates", "report", "all"]
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class folders of images")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--num", type=int, default=1000, help="samples per guidance weight")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    args = parser.parse_args()
    args.curve_num, args.max_minutes = 0, float("inf")
    settings = settings_for(args)
    if args.quick:
        settings.num = 20
    pieces = {"ref": piece_ref, "train": piece_train, "sweep": piece_sweep,
              "cars": piece_cars, "rates": piece_rates, "report": piece_report}  # fmt: skip
    for name in list(pieces) if args.piece == "all" else [args.piece]:
        pieces[name](settings)


if __name__ == "__main__":
    main()
