"""Turn bench/results/quality/*.json into the "## Quality" section of docs/benchmarks.md."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from common import BENCHMARKS, ROOT, replace_section, write_section

HEADER = "## Quality"
FIGURES = ROOT / "docs" / "figures"

INTRO = """\
Protocol (issue 5): each entry trains on the 5,000 CIFAR-10 training cars
(`../shared/data/cifar10-jpg/train/automobile`) for the same wall-clock budget on the same
2-core CPU, then samples 1,000 images with its default sampler; FID-1k and KID (TF-Inception
pool3, `difflab eval`) are measured against the statistics of the 5,000 training cars
(`difflab ref`). FID at n = 1,000 is biased upwards, so entries are ranked by KID and FID-1k
together (the sum of the two ranks; a tie goes to the entry with fewer network evaluations per
image) and listed best first.
Reference points quoted from issue 5 (not measured here): 1,000 real CIFAR-10 *test* cars
score FID-1k 24.1 and KID about 0 against the training cars; the tutorial notebook's own code
after 30 minutes (228 steps) scores FID-1k 479.6, KID 0.659.

The baseline `lucidrains` is denoising-diffusion-pytorch 2.3.4 with its README recipe scaled to
the CPU (`Unet(dim=32, dim_mults=(1, 2, 4))`, 1,000 steps, Adam 8e-5, batch 32, flips, EMA
0.995 every 10 steps, 1,000 samples from the EMA model with its 100-step DDIM), run by
`bench/quality.py baseline` in its own environment under the same budget and protocol.

Reproduce: `python bench/quality.py all` (resumable; see `bench/README.md`), or one piece at a
time: `ref`, `train ENTRY`, `eval ENTRY`, `baseline`, `curve ENTRY`, `samplers ENTRY`,
`seeds ENTRY`, `memorisation ENTRY`, `report`.

The entries below were measured with the presets of 2026-11-25. Since issue 14, `flow-cpu`
holds a cheaper recipe (32 base channels, batches of 16, a learning rate that cools down at the
end of the budget, sampled with autoguidance by its own earlier weights) that scores better at
the same budgets: "## Ablation" has it, lever by lever, with the old `flow-cpu` as its `base`;
rerunning `quality.py train flow` trains the new preset.
"""


def ranked(evals: dict[str, dict]) -> list[str]:
    """Entry names, best first, by KID and FID-1k together (issue 5: FID-1k alone is biased at
    n = 1,000): the sum of an entry's rank by KID and its rank by FID; a tie goes to the entry
    with fewer network evaluations per image (cheaper to sample), then to the lower KID."""
    by_kid = sorted(evals, key=lambda name: evals[name]["kid_mean"])
    by_fid = sorted(evals, key=lambda name: evals[name]["fid"])
    return sorted(
        evals,
        key=lambda name: (
            by_kid.index(name) + by_fid.index(name),
            evals[name].get("evaluations_per_image", 0),
            evals[name]["kid_mean"],
        ),
    )


def _targets(evals: dict[str, dict]) -> list[str]:
    """Issue 5's targets, checked against whatever has been measured."""
    ours = {name: r for name, r in evals.items() if name not in ("lucidrains", "tutorial")}
    if not ours or "lucidrains" not in evals:
        return []
    name = ranked(ours)[0]
    best = ours[name]
    base = evals["lucidrains"]
    tutorial = evals.get("tutorial", {"fid": 479.6, "kid_mean": 0.659})  # else issue 5's figures
    ratio = best["kid_mean"] / base["kid_mean"]
    met = (
        best["fid"] < min(base["fid"], tutorial["fid"])
        and best["kid_mean"] < tutorial["kid_mean"]
        and ratio <= 1 / 3
    )
    return [
        f"Targets (issue 5): the best difflab CPU entry so far, `{name}`, scores FID-1k "
        f"{best['fid']:.1f} and KID {best['kid_mean']:.4f}; the denoising-diffusion-pytorch "
        f"baseline {base['fid']:.1f} and {base['kid_mean']:.4f}; the tutorial"
        f"{' (quoted from issue 5)' if 'tutorial' not in evals else ''} "
        f"{tutorial['fid']:.1f} and {tutorial['kid_mean']:.4f}. Ratios best / baseline: FID-1k "
        f"{best['fid'] / base['fid']:.2f} (target below 1), KID {ratio:.2f} (target at most 0.33). "
        f"Target {'met' if met else 'NOT met'}.",
        "",
    ]


def _main_table(evals: dict[str, dict]) -> list[str]:
    lines = [
        "| entry | parameters | minutes | steps | images seen | train img/s | sample img/s "
        "| evaluations/img | FID-1k | KID |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in ranked(evals):
        r = evals[name]
        lines.append(
            f"| {r['label']} (`{name}`) | {r['parameters']:,} | {r['train_minutes']:.1f} "
            f"| {r['steps']:,} | {r['images_seen']:,} | {r['train_images_per_s']:.1f} "
            f"| {r['sample_images_per_s']:.2f} | {r['evaluations_per_image']} | {r['fid']:.1f} "
            f"| {r['kid_mean']:.4f} ± {r['kid_std']:.4f} |"
        )
    return lines


def _table(title: str, header: list[str], rows: list[list], align: str = "---") -> list[str]:
    """A "###" heading and a Markdown table; the first column uses ``align``, the rest right."""
    return [
        f"### {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([align] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(map(str, row)) + " |" for row in rows),
        "",
    ]


def _sections(
    settings, load: Callable[[object, str], dict[str, dict]], expected: list[str], figures: Path
) -> list[str]:
    lines = [HEADER, "", INTRO]
    evals = load(settings, "eval")
    if evals:
        dates = sorted(r["date"] for r in evals.values())
        machines = sorted({r["machine"] for r in evals.values()})
        lines += [f"Measured {dates[0]} to {dates[-1]} on {'; '.join(machines)}.", ""]
        lines += [*_main_table(evals), ""]
        lines += _targets(evals)
        for name in ranked(evals):  # table order
            if (figures / f"bench-{name}.png").exists():
                strip = (figures / f"bench-{name}-strip.png").exists()
                lines += [
                    f"`{name}`, 64 samples"
                    + (" (seed 0) and the reverse process of one:" if strip else ":"),
                    "",
                    f"![{name} samples](figures/bench-{name}.png)",
                    *(
                        [f"![{name} reverse process](figures/bench-{name}-strip.png)"]
                        if strip
                        else []
                    ),
                    "",
                ]
    missing = [name for name in expected if name not in evals]
    if missing:
        lines += ["Not measured yet: " + ", ".join(f"`{name}`" for name in missing) + ".", ""]
    for name, r in load(settings, "samplers").items():
        lines += _table(
            f"Samplers of `{name}` (FID-{r.get('num', 1000)} against network evaluations)",
            ["sampler", "steps", "evaluations/img", "FID", "KID"],
            [[x["sampler"], x["steps"], x["evaluations"], f"{x['fid']:.1f}", f"{x['kid']:.4f}"]
             for x in sorted(r["rows"], key=lambda x: (x["sampler"], x["evaluations"]))],
        )  # fmt: skip
        by_sampler: dict[str, list[dict]] = {}
        for row in sorted(r["rows"], key=lambda row: row["evaluations"]):
            by_sampler.setdefault(row["sampler"], []).append(row)
        lines += _plot(
            figures / f"samplers-{name}.png",
            {s: ([x["evaluations"] for x in rows], [x["fid"] for x in rows])
             for s, rows in by_sampler.items()},
            f"FID of {name} against network evaluations",
            xlabel="network evaluations per image",
            logx=True,
        )  # fmt: skip
    for name, r in load(settings, "seeds").items():
        fids = ", ".join(f"{f:.1f}" for f in r["fid"])
        kids = ", ".join(f"{k:.4f}" for k in r["kid"])
        spread = (
            f" (mean {statistics.mean(r['fid']):.1f}, std {statistics.stdev(r['fid']):.1f})"
            if len(r["fid"]) > 1
            else ""
        )
        lines += [
            f"Spread over sampling seeds {', '.join(map(str, r['seed']))} for `{name}` (same "
            f"network, 1,000 samples each): FID-1k {fids}{spread}; KID {kids}.",
            "",
        ]
    for name, r in load(settings, "memorisation").items():
        lines += [
            f"Memorisation check for `{name}` ({r['count']} samples): pixel RMS distance to the "
            f"nearest training car, median {r['pixel_rms_to_nearest_median']:.1f}, minimum "
            f"{r['pixel_rms_to_nearest_min']:.1f} (0-255 scale); for scale, {r['count']} training "
            "cars to their nearest other training car: median "
            f"{r['train_pixel_rms_to_nearest_median']:.1f}, minimum "
            f"{r['train_pixel_rms_to_nearest_min']:.1f}. Triples in `{r['figure']}` (sample, "
            "nearest in pixels, nearest in Inception features), four to a row:",
            "",
            f"![memorisation check of {name}]({Path(r['figure']).relative_to('docs')})",
            "",
        ]
    curves = load(settings, "curve")
    for name, r in curves.items():
        lines += _table(
            f"FID-{r['num']} of `{name}` against training time",
            ["minutes", "step", "FID", "KID"],
            [[f"{p['minutes']:.1f}", f"{p['step']:,}", f"{p['fid']:.1f}", f"{p['kid']:.4f}"]
             for p in r["points"]],
            align="---:",
        )  # fmt: skip
    if any(len(r["points"]) > 1 for r in curves.values()):
        lines += _plot(
            figures / "fid-vs-time.png",
            {name: ([p["minutes"] for p in r["points"]], [p["fid"] for p in r["points"]])
             for name, r in curves.items()},
            "FID against training time",
            xlabel="training minutes (2-core CPU)",
        )  # fmt: skip
    return lines


def _plot(figure: Path, series: dict, alt: str, *, xlabel: str, logx: bool = False) -> list[str]:
    """FID (log scale) of named series, saved as ``figure``; the Markdown that shows it."""
    from difflab.viz import plot_lines

    plot_lines(series, figure, xlabel=xlabel, ylabel="FID", logy=True, logx=logx)
    return [f"![{alt}](figures/{figure.name})", ""]


def section(
    settings, load: Callable[[object, str], dict[str, dict]], expected: list[str], figures: Path
) -> str:
    """The section from the results ``load`` finds (bench/results/quality alone); the plots are
    written to ``figures``, where the sample pictures shown are looked for."""
    return "\n".join(_sections(settings, load, expected, figures)).rstrip() + "\n"


def write(settings, load, expected: list[str]) -> None:
    figures = settings.out if settings.quick else FIGURES  # a smoke test's plots stay in bench/out
    section_text = section(settings, load, expected, figures)
    if settings.quick:  # the other sections of docs/benchmarks.md, this one from the smoke test
        target = settings.out / "benchmarks.md"
        text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
        target.write_text(replace_section(text, HEADER, section_text))
        print(f"quick report written to {target}")
        return
    write_section(HEADER, section_text)
    print(f"updated {BENCHMARKS.relative_to(ROOT)}")
