"""Turn bench/results/quality/*.json into the "## Quality" section of docs/benchmarks.md."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
HEADER = "## Quality"

INTRO = """\
Protocol (issue 5): each entry trains on the 5,000 CIFAR-10 training cars
(`../shared/data/cifar10-jpg/train/automobile`) for the same wall-clock budget on the same
2-core CPU, then samples 1,000 images with its default sampler; FID-1k and KID (TF-Inception
pool3, `difflab eval`) are measured against the statistics of the 5,000 training cars
(`difflab ref`). FID at n = 1,000 is biased upwards, so read it together with KID.
Reference points quoted from issue 5 (not measured here): 1,000 real CIFAR-10 *test* cars
score FID-1k 24.1 and KID about 0 against the training cars; the tutorial notebook's own code
after 30 minutes (228 steps) scores FID-1k 479.6, KID 0.659.

Reproduce: `python bench/quality.py all` (resumable; see `bench/README.md`).
"""


def _main_table(evals: dict[str, dict]) -> list[str]:
    lines = [
        "| entry | parameters | minutes | steps | images seen | train img/s | sample img/s "
        "| evaluations/img | FID-1k | KID |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in sorted(evals.items(), key=lambda item: item[1]["kid_mean"]):
        lines.append(
            f"| {r['label']} (`{name}`) | {r['parameters']:,} | {r['train_minutes']:.1f} "
            f"| {r['steps']:,} | {r['images_seen']:,} | {r['train_images_per_s']:.1f} "
            f"| {r['sample_images_per_s']:.2f} | {r['evaluations_per_image']} | {r['fid']:.1f} "
            f"| {r['kid_mean']:.4f} ± {r['kid_std']:.4f} |"
        )
    return lines


def _sections(settings, load: Callable[[object, str], dict[str, dict]]) -> list[str]:
    lines = [HEADER, "", INTRO]
    evals = load(settings, "eval")
    if evals:
        any_result = next(iter(evals.values()))
        lines += [f"Measured {any_result['date']} on {any_result['machine']}.", ""]
        lines += [*_main_table(evals), ""]
    else:
        lines += ["No entry has been measured yet.", ""]
    for name, r in load(settings, "samplers").items():
        lines += [f"### Samplers of `{name}` (FID-1k against network evaluations)", ""]
        lines += ["| sampler | steps | FID-1k | KID |", "|---|---:|---:|---:|"]
        lines += [
            f"| {x['sampler']} | {x['steps']} | {x['fid']:.1f} | {x['kid']:.4f} |"
            for x in r["rows"]
        ]
        lines.append("")
    for name, r in load(settings, "seeds").items():
        fids = ", ".join(f"{f:.1f}" for f in r["fid"])
        lines += [f"Spread over 3 sampling seeds for `{name}`: FID-1k {fids}.", ""]
    for name, r in load(settings, "memorisation").items():
        lines += [
            f"Memorisation check for `{name}` ({r['count']} samples): pixel RMS distance to the "
            f"nearest training car, median {r['pixel_rms_to_nearest_median']:.1f}, minimum "
            f"{r['pixel_rms_to_nearest_min']:.1f} (0-255 scale); pairs in `{r['figure']}` "
            "(sample, nearest in pixels, nearest in Inception features).",
            "",
        ]
    curves = load(settings, "curve")
    if curves:
        from difflab.viz import plot_lines

        series = {
            name: ([p["minutes"] for p in r["points"]], [p["fid"] for p in r["points"]])
            for name, r in curves.items()
        }
        figure = ROOT / "docs" / "figures" / "fid-vs-time.png"
        plot_lines(series, figure, xlabel="training minutes (2-core CPU)", ylabel="FID", logy=True)
        lines += ["![FID against training time](figures/fid-vs-time.png)", ""]
    return lines


def write(settings, load) -> None:
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    section = "\n".join(_sections(settings, load)).rstrip() + "\n"
    pattern = re.compile(rf"^{re.escape(HEADER)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    if settings.quick:
        target = settings.out / "benchmarks.md"
        target.write_text(text)
        print(f"quick report written to {target}")
        return
    BENCHMARKS.write_text(text)
    print(f"updated {BENCHMARKS.relative_to(ROOT)}")
