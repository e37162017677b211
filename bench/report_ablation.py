"""Turn bench/results/ablation/*.json into the "## Ablation" section of docs/benchmarks.md."""

from __future__ import annotations

import json

from ablation import BASE_BATCH, BUDGET_STEPS, LEVERS, RESULTS
from common import write_section

HEADER = "## Ablation"

INTRO = f"""\
Issue 14: better cars per CPU-minute, one lever at a time on `flow-cpu`. Each lever trains on
the 5,000 training cars for the images `flow-cpu` saw on the quality benchmark's machine in 10
and 30 minutes ({BUDGET_STEPS[10]:,} and {BUDGET_STEPS[30]:,} steps of {BASE_BATCH}; fp32 matmul
peak 186 GFLOP/s), then samples 1,000 images with its default sampler (Heun, 35 network
evaluations unless the row says otherwise; the autoguided rows, `ag*`, evaluate two networks at
each step: 70); FID-1k and KID against the 5,000 training cars, the
protocol of "## Quality". A budget in images makes quality independent of how fast or busy the
machine that measures it is; a lever that costs more per image than `flow-cpu` gets
proportionally fewer images (the speed table below, measured on one machine in one run).
"Builds on" names the lever whose settings a row keeps. The base at 30 minutes is the quality
benchmark's own `flow` entry: training is deterministic for a number of images, and the base at
10 minutes reproduced that benchmark's 10-minute FID-1k and KID to the last digit here. Over
sampling seeds FID-1k moved by 0.5 (std; "## Quality", `flow`); over training seeds much more:
the new `flow-cpu` (`ch32-b16`) at the 10-minute budget scored 82.6 with seed 0 and 86.7 with
seed 1 (`b16-seed1`). So a difference of about 4 points or less between two rows is not a
result (`cooldown`, `lr2e-3`, 32 against 48 channels at 10 minutes, and every lever that builds
on `ch32-b16` among them); one seed per lever only ranks the large effects.

Each cell: FID-1k / KID (FID-1k against the base at the same budget), the optimizer steps, and
the training minutes on the machine named below the table. Those minutes check the budgets: the
quiet 10-minute runs took 4.9-5.7 minutes here, the smaller networks 3-15% longer than the base
(the synthetic speed test below counts only the optimizer step; a small network pays relatively
more for the rest of the loop). `base` and `batch16` at 10 minutes trained beside the test suite,
so their minutes are inflated (`cooldown` trains the base's network for the same steps in 4.9).

Reproduce: `cd bench && python ablation.py run LEVER... [--budget 10|30]`, `python ablation.py
speed` (alone on the machine), `python ablation.py report`.
"""


def _load(pattern: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))}


def _cell(result: dict | None, base: dict | None) -> str:
    if result is None:
        return "-"
    text = f"{result['fid']:.1f} / {result['kid_mean']:.4f}"
    if base is not None and result is not base:
        text += f" ({result['fid'] - base['fid']:+.1f})"
    minutes = f", {result['train_minutes']:.1f} min" if "train_minutes" in result else ""
    return text + f", {result['step']:,} steps{minutes}" + result.get("note", "")


def body() -> str:
    evals = _load("eval-*.json")
    quality = RESULTS.parent / "quality" / "eval-flow.json"
    if "eval-base-30" not in evals and quality.exists():  # the same images, deterministic
        evals["eval-base-30"] = {
            **json.loads(quality.read_text()),
            "note": " (quality benchmark)",
            "borrowed": True,
        }
    get = {
        (name, budget): evals.get(f"eval-{name}-{budget}") for name in LEVERS for budget in (10, 30)
    }
    lines = [
        f"{HEADER}\n",
        INTRO,
        "| lever | what changes | builds on | 10-minute budget: FID-1k / KID (vs base) "
        "| 30-minute budget |",
        "|---|---|---|---|---|",
    ]
    for name, lever in LEVERS.items():
        if get[(name, 10)] is None and get[(name, 30)] is None:
            continue
        cells = [_cell(get[(name, b)], get[("base", b)]) for b in (10, 30)]
        lines.append(f"| `{name}` | {lever.what} | {lever.on or '-'} | {' | '.join(cells)} |")
    for budget, target in ((10, 70.0), (30, 55.0)):
        done = {name: get[(name, budget)] for name in LEVERS if get[(name, budget)] is not None}
        if done:
            name = min(done, key=lambda n: done[n]["fid"])
            met = "met" if done[name]["fid"] <= target else "not met"
            lines.append(
                f"\nIssue 14's {budget}-minute target, FID-1k at most {target:g}: best "
                f"{done[name]['fid']:.1f} (`{name}`), {met}."
            )
    lines.append("\n" + (RESULTS / "findings.md").read_text())  # what paid, what to try next
    missing = [name for name in LEVERS if get[(name, 10)] is None and get[(name, 30)] is None]
    if missing:
        names = ", ".join(f"`{name}`" for name in missing)
        lines.append(f"\nDefined in `bench/ablation.py` but not run yet: {names}.")
    dates = sorted(r["date"] for r in evals.values() if not r.get("borrowed"))
    if dates:
        machine = next(iter(evals.values()))["machine"]
        lines.append(f"\nMeasured {dates[0]} to {dates[-1]} on {machine}.")
    speed_path = RESULTS / "speed.json"
    if speed_path.exists():
        speed = json.loads(speed_path.read_text())
        per = speed["seconds_per_image"]
        peaks = ", ".join(f"{p:.0f}" for p in speed["matmul_gflops"])
        lines += [
            f"\nTraining speed on synthetic 32x32 images ({speed['cpu']}, fp32 matmul peak "
            f"{peaks} GFLOP/s at the start and end of each timing run, "
            f"{speed['torch_threads']} torch threads; best of 3 x 20 steps; a lever timed in a "
            f"later run keeps its cost relative to the base timed beside it; {speed['date']}). "
            "A lever's budget is the base's images times the last column's inverse:\n",
            "| lever | img/s | cost per image vs base |",
            "|---|---:|---:|",
        ]
        lines += [f"| `{name}` | {1 / s:.1f} | {s / per['base']:.2f} |" for name, s in per.items()]
    return "\n".join(lines) + "\n"


def write_report() -> None:
    print(f"wrote {write_section(HEADER, body())}")
