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
evaluations unless the row says otherwise); FID-1k and KID against the 5,000 training cars, the
protocol of "## Quality". A budget in images makes quality independent of how fast or busy the
machine that measures it is; a lever that costs more per image than `flow-cpu` gets
proportionally fewer images (the speed table below, measured on one machine in one run).
"Builds on" names the lever whose settings a row keeps. FID-1k moves by a few points between
training seeds (the `seed1` row), so differences smaller than that are not results.

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
    return text


def body() -> str:
    evals = _load("eval-*.json")
    get = {
        (name, budget): evals.get(f"eval-{name}-{budget}") for name in LEVERS for budget in (10, 30)
    }
    lines = [
        INTRO,
        "| lever | what changes | builds on | 10-minute budget: FID-1k / KID (vs base) "
        "| 30-minute budget |",
        "|---|---|---|---|---|",
    ]
    for name, lever in LEVERS.items():
        if get[(name, 10)] is None and get[(name, 30)] is None:
            continue
        cells = [_cell(get[(name, b)], get[("base", b)]) for b in (10, 30)]
        lines.append(
            f"| `{name}` | {lever.what} | {lever.on or 'flow-cpu'} | {' | '.join(cells)} |"
        )
    dates = sorted(r["date"] for r in evals.values())
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
            f"{peaks} GFLOP/s before and after, {speed['torch_threads']} torch threads; best of "
            f"3 x 20 steps; {speed['date']}):\n",
            "| lever | img/s | cost per image vs base |",
            "|---|---:|---:|",
        ]
        lines += [f"| `{name}` | {1 / s:.1f} | {s / per['base']:.2f} |" for name, s in per.items()]
    return "\n".join(lines) + "\n"


def write_report() -> None:
    print(f"wrote {write_section(HEADER, body())}")
