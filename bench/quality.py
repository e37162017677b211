"""Quality per compute: every method for the same wall-clock budget on this CPU, then FID / KID.

Resumable, one piece at a time; every result lands in bench/results/quality/*.json as soon as
it is measured, and ``report`` turns whatever has landed into docs/benchmarks.md ("## Quality").

    python bench/quality.py ref                 # Inception statistics of the 5,000 training cars
    python bench/quality.py train edm           # 30 minutes of training (in 4 resumable chunks)
    python bench/quality.py eval edm            # 1,000 samples, FID-1k, KID, speeds
    python bench/quality.py curve edm           # FID against training time (the chunk ends)
    python bench/quality.py samplers edm        # FID-1k against network evaluations
    python bench/quality.py seeds edm           # spread of FID-1k over 3 sampling seeds
    python bench/quality.py memorisation edm    # nearest training images of 100 samples
    python bench/quality.py baseline            # denoising-diffusion-pytorch, same budget
    python bench/quality.py report              # write docs/benchmarks.md
    python bench/quality.py all                 # every missing piece: entries, baseline, curves,
                                                # then samplers/seeds/memorisation of the best

Run nothing else heavy while a timed piece runs: the budgets are wall-clock on 2 cores.
``--quick`` shrinks every budget to a smoke test (results go to bench/out/quick/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from quality_setup import (
    DEFAULT_DATA,
    ENTRIES,
    ROOT,
    SAMPLER_SWEEP,
    Settings,
    difflab,
    save,
)

if TYPE_CHECKING:
    from difflab.train.checkpoint import Checkpoint


# --------------------------------------------------------------------------- pieces


def piece_ref(settings: Settings) -> None:
    if settings.ref.exists():
        return
    if settings.ref_num:  # quick: a small folder of real cars
        folder = settings.out / "ref-images"
        _copy_cars(Path(settings.data) / "automobile", folder, settings.ref_num)
        difflab(settings, "ref", folder, "--out", settings.ref)
    else:
        difflab(settings, "ref", settings.data, "--class", "automobile", "--out", settings.ref)


def _copy_cars(source: Path, folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir())[:count]:
        (folder / path.name).write_bytes(path.read_bytes())


def _elapsed_minutes(run_dir: Path) -> float:
    from difflab.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    return 0.0 if ckpt is None else ckpt.state["elapsed"] / 60


def piece_train(settings: Settings, name: str) -> None:
    """Train for the budget in equal chunks; each chunk's end is a kept checkpoint. A preset
    whose learning rate cools down at the end of the budget trains in one piece: its first
    invocation turns the whole budget into steps."""
    from difflab.config import load_preset

    entry, run_dir = ENTRIES[name], settings.run_dir(name)
    one_piece = load_preset(entry.preset).train.lr_schedule == "cooldown"
    chunk = settings.minutes / (1 if one_piece else settings.chunks)
    while (done := _elapsed_minutes(run_dir)) < settings.minutes - 0.01:
        limit = min(chunk, settings.minutes - done)
        if (run_dir / "config.json").exists():
            difflab(settings, "train", "--resume", run_dir, "--time-limit", limit, "--no-progress")
            continue
        extra = ["--method", entry.method] if entry.method else []
        difflab(
            settings, "train", "--preset", entry.preset, *extra, "--data", settings.data,
            "--class", "automobile", "--out", run_dir, "--time-limit", limit,
            *([] if one_piece else ["--steps", 10**9]),
            "--set", "train.keep_last=1000", "--set", "train.checkpoint_every=1000000000",
            "--set", "train.sample_every_kimg=0", "--no-progress",
        )  # fmt: skip


def _evaluate(settings: Settings, name: str, num: int, *extra: object) -> dict:
    json_path = settings.out / "evals" / f"{name}-{time.time_ns()}.json"
    started = time.monotonic()
    difflab(settings, "eval", settings.run_dir(name), "--ref", settings.ref, "--num", num,
            "--json", json_path, *extra)  # fmt: skip
    result = json.loads(json_path.read_text())
    result["eval_seconds"] = time.monotonic() - started
    return result


def _sampling_rate(settings: Settings, name: str, num: int) -> tuple[float, int]:
    """Images per second of the run's default sampler (in-process, after a warm-up batch),
    and network evaluations per image."""
    from difflab.api import load_run

    run = load_run(settings.run_dir(name))
    run.sample(2)
    started = time.monotonic()
    result = run.generate(num, seed=0)
    return num / (time.monotonic() - started), result.evaluations


def _eval_result(settings: Settings, name: str) -> dict:
    """The eval piece's result for an entry (latest checkpoint, default sampler, seed 0), or {}
    before it ran."""
    path = settings.result("eval", name)
    return json.loads(path.read_text()) if path.exists() else {}


def _measure(
    settings: Settings,
    name: str,
    num: int,
    *,
    checkpoint: Checkpoint | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> dict:
    """FID/KID of ``num`` samples; the eval piece's result when it is this measurement, else a
    new evaluation."""
    result = _eval_result(settings, name)
    wanted = {
        "step": None if checkpoint is None else checkpoint.step,
        "sampler": sampler,
        "sampler_steps": steps,
    }
    if (
        result
        and result["num_gen"] == num
        and seed == 0
        and all(value is None or result.get(key) == value for key, value in wanted.items())
    ):
        return result
    extra = [] if checkpoint is None else ["--checkpoint", checkpoint.path]
    extra += [] if sampler is None else ["--sampler", sampler]
    extra += [] if steps is None else ["--steps", steps]
    return _evaluate(settings, name, num, "--seed", seed, *extra)


def piece_eval(settings: Settings, name: str) -> None:
    from difflab.api import load_run
    from difflab.models import count_parameters
    from difflab.train.checkpoint import latest_checkpoint

    run_dir = settings.run_dir(name)
    ckpt = latest_checkpoint(run_dir)
    images_per_s, evaluations = _sampling_rate(settings, name, min(settings.num, 100))
    result = _evaluate(settings, name, settings.num)
    result["sampler_steps"] = result.pop("steps")  # "steps" below is the training steps
    result.update(
        entry=name,
        label=ENTRIES[name].label,
        preset=ENTRIES[name].preset,
        train_minutes=ckpt.state["elapsed"] / 60,
        steps=ckpt.step,
        images_seen=ckpt.state["images_seen"],
        train_images_per_s=ckpt.state["images_seen"] / ckpt.state["elapsed"],
        sample_images_per_s=images_per_s,
        evaluations_per_image=evaluations,
        parameters=count_parameters(load_run(run_dir, device="cpu").net),
    )
    save(settings.result("eval", name), result)


def piece_curve(settings: Settings, name: str) -> None:
    """FID/KID at every kept checkpoint (the chunk ends), on ``curve_num`` samples.

    Resumable: points already in the result file are kept. The eval piece's checkpoint comes
    first (its point costs nothing); ``--max-minutes`` skips the other checkpoints trained longer."""
    from difflab.train.checkpoint import list_checkpoints, load_checkpoint

    path = settings.result("curve", name)
    points = json.loads(path.read_text())["points"] if path.exists() else []
    checkpoints = [load_checkpoint(c) for c in list_checkpoints(settings.run_dir(name))]
    minutes = [c.state["elapsed"] / 60 for c in checkpoints]
    free_step = _eval_result(settings, name).get("step")
    todo = [
        (checkpoint, elapsed)
        for i, (checkpoint, elapsed) in enumerate(zip(checkpoints, minutes, strict=True))
        if not any(abs(p["minutes"] - elapsed) < 1e-6 for p in points)
        and not (i + 1 < len(minutes) and minutes[i + 1] - elapsed < 1.0)  # a short top-up
        and (checkpoint.step == free_step or elapsed <= settings.max_minutes)
    ]
    todo.sort(key=lambda item: item[0].step != free_step)  # stable: then in time order
    for checkpoint, elapsed in todo:
        result = _measure(settings, name, settings.curve_num, checkpoint=checkpoint)
        points.append({"minutes": elapsed, "step": result["step"], "fid": result["fid"],
                       "kid": result["kid_mean"], "kid_std": result["kid_std"]})  # fmt: skip
        points.sort(key=lambda p: p["minutes"])
        save(path, {"entry": name, "num": settings.curve_num, "points": points})


def piece_samplers(settings: Settings, name: str) -> None:
    """FID-1k for each sampler and step count of the sweep; resumable, row by row, fewest steps
    first (a sweep cut short still covers every sampler). The default sampler's row at its
    default steps is the eval piece's result."""
    path = settings.result("samplers", name)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    sweep = [(s, n) for s, step_counts in SAMPLER_SWEEP.get(name, []) for n in step_counts]
    for sampler, steps in sorted(sweep, key=lambda row: row[1]):
        if any(r["sampler"] == sampler and r["steps"] == steps for r in rows):
            continue
        result = _measure(settings, name, settings.num, sampler=sampler, steps=steps)
        evaluations = result.get("evaluations") or result["evaluations_per_image"]
        rows.append({"sampler": sampler, "steps": steps, "evaluations": evaluations,
                     "fid": result["fid"], "kid": result["kid_mean"]})  # fmt: skip
        save(path, {"entry": name, "num": settings.num, "rows": rows})


def piece_seeds(settings: Settings, name: str) -> None:
    """FID-1k over 3 sampling seeds; seed 0 is the eval piece's result. Saved seed by seed."""
    path = settings.result("seeds", name)
    done = json.loads(path.read_text()) if path.exists() else {"seed": [], "fid": [], "kid": []}
    for seed in (0, 1, 2):
        if seed in done["seed"]:
            continue
        result = _measure(settings, name, settings.num, seed=seed)
        done["seed"].append(seed)
        done["fid"].append(result["fid"])
        done["kid"].append(result["kid_mean"])
        save(path, {"entry": name, **{key: done[key] for key in ("seed", "fid", "kid")}})


def piece_memorisation(settings: Settings, name: str) -> None:
    """Nearest training image of 100 samples, in Inception features and in pixels."""
    import numpy as np
    import torch

    from difflab.api import load_run
    from difflab.data import load_images
    from difflab.metrics import InceptionFeatures, extract_features, load_stats
    from difflab.viz import save_grid, to_uint8

    count = 10 if settings.quick else 100
    run = load_run(settings.run_dir(name), device="cpu")
    samples = run.sample(count, seed=123)
    train = load_images(settings.data, "automobile", 32).images
    ref = load_stats(settings.ref)
    gen_features = extract_features(to_uint8(samples), InceptionFeatures(), desc="memorisation")
    train_features = ref.features.astype(np.float64)
    feature_nn = np.argmin(((gen_features[:, None] - train_features[None]) ** 2).sum(-1), axis=1)
    pixels = to_uint8(samples).float().flatten(1)
    train_pixels = train[: len(train_features)].float().flatten(1)
    pixel_dist = torch.cdist(pixels, train_pixels)
    pixel_nn = pixel_dist.argmin(1)
    pairs = torch.stack([to_uint8(samples), train[pixel_nn], train[torch.as_tensor(feature_nn)]], 1)
    figure = ROOT / "docs" / "figures" / f"memorisation-{name}.png"
    save_grid(pairs[:24].flatten(0, 1).float() / 127.5 - 1, figure, nrow=12)
    rms = (pixel_dist.min(1).values / pixels.shape[1] ** 0.5).tolist()
    train_rms = train_nearest_rms(train_pixels, count)
    save(settings.result("memorisation", name), {
        "entry": name, "count": count, "figure": str(figure.relative_to(ROOT)),
        "pixel_rms_to_nearest_min": min(rms), "pixel_rms_to_nearest_median": float(np.median(rms)),
        "train_pixel_rms_to_nearest_min": min(train_rms),
        "train_pixel_rms_to_nearest_median": float(np.median(train_rms)),
    })  # fmt: skip


def train_nearest_rms(train_pixels, count: int) -> list[float]:
    """For scale: pixel RMS from each of the first ``count`` training images to its nearest
    *other* training image (0-255 scale). Near-duplicates inside CIFAR-10 show up here too."""
    import torch

    dist = torch.cdist(train_pixels[:count], train_pixels)
    dist[torch.arange(count), torch.arange(count)] = float("inf")
    return (dist.min(1).values / train_pixels.shape[1] ** 0.5).tolist()


BASELINE_PYTHON = ROOT / "bench" / "out" / "venv-baseline" / "bin" / "python"


def piece_baseline(settings: Settings) -> None:
    """denoising-diffusion-pytorch's README recipe in its own environment, scored like an entry."""
    if settings.result("eval", "lucidrains").exists():
        return
    if not BASELINE_PYTHON.exists():
        raise SystemExit(f"no {BASELINE_PYTHON}: create it as bench/baseline_lucidrains.py says")
    out = settings.out / "baseline"
    command = [BASELINE_PYTHON, ROOT / "bench" / "baseline_lucidrains.py", "--out", out,
               "--data", Path(settings.data) / "automobile", "--minutes", settings.minutes,
               "--num", settings.num]  # fmt: skip
    print("$", " ".join(map(str, command[1:])), flush=True)
    subprocess.run(list(map(str, command)), check=True, cwd=ROOT)
    json_path = settings.out / "evals" / f"lucidrains-{time.time_ns()}.json"
    difflab(settings, "eval", out / "samples", "--ref", settings.ref, "--json", json_path)
    result = json.loads(json_path.read_text())
    result.update(json.loads((out / "result.json").read_text()))
    result.update(
        entry="lucidrains",
        label="denoising-diffusion-pytorch 2.3.4, README recipe (baseline)",
        preset="-",
    )
    save(settings.result("eval", "lucidrains"), result)


# --------------------------------------------------------------------------- report


def load_results(settings: Settings, piece: str) -> dict[str, dict]:
    found = {}
    for path in sorted(settings.results.glob(f"{piece}-*.json")):
        found[path.stem[len(piece) + 1 :]] = json.loads(path.read_text())
    return found


def piece_report(settings: Settings) -> None:
    import report_quality

    from difflab.report import write_report

    report_quality.write(settings, load_results, [*ENTRIES, "lucidrains"])
    runs = [
        settings.run_dir(name)
        for name in ENTRIES
        if (settings.run_dir(name) / "config.json").exists()
    ]
    if runs:  # the entries side by side, by eye (bench/out is not committed)
        print(f"wrote {write_report(runs, settings.out / 'report.html')}")


PIECES = {
    "train": piece_train, "eval": piece_eval, "curve": piece_curve, "samplers": piece_samplers,
    "seeds": piece_seeds, "memorisation": piece_memorisation,
}  # fmt: skip


def best_entry(settings: Settings) -> str:
    """The best measured entry (KID and FID-1k together): the model of the sampler and seed
    pieces."""
    import report_quality

    evals = {name: r for name, r in load_results(settings, "eval").items() if name in ENTRIES}
    return report_quality.ranked(evals)[0]


def piece_all(settings: Settings) -> None:
    """Every missing piece, in order: entries, baseline, curves, then the sampler sweep, seed
    spread and memorisation check of the best entry."""
    piece_ref(settings)
    for name in ENTRIES:
        piece_train(settings, name)
        if not settings.result("eval", name).exists():
            piece_eval(settings, name)
    piece_baseline(settings)
    for name in ENTRIES:
        piece_curve(settings, name)
    best = best_entry(settings)
    piece_samplers(settings, best)
    piece_seeds(settings, best)
    if not settings.result("memorisation", best).exists():
        piece_memorisation(settings, best)
    piece_report(settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("piece", choices=["ref", "report", "all", "baseline", *PIECES])
    parser.add_argument("entry", nargs="?", choices=list(ENTRIES))
    parser.add_argument("--data", default=os.environ.get("DIFFLAB_DATA", DEFAULT_DATA))
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per entry")
    parser.add_argument("--chunks", type=int, default=4, help="resumable chunks (curve points)")
    parser.add_argument("--num", type=int, default=1000, help="samples for FID-1k")
    parser.add_argument("--curve-num", type=int, default=1000, help="samples per curve point")
    parser.add_argument("--max-minutes", type=float, default=float("inf"),
                        help="curve: only checkpoints up to this training time")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    args = parser.parse_args()
    settings = Settings(args)
    if args.piece == "ref":
        piece_ref(settings)
    elif args.piece == "report":
        piece_report(settings)
    elif args.piece == "baseline":
        piece_ref(settings)
        piece_baseline(settings)
    elif args.piece == "all":
        piece_all(settings)
    else:
        if args.entry is None:
            parser.error(f"{args.piece} needs an entry: {', '.join(ENTRIES)}")
        if args.piece != "train":
            piece_ref(settings)
        PIECES[args.piece](settings, args.entry)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
