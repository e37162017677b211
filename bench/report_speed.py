"""The "## Speed" section of docs/benchmarks.md, rendered from bench/throughput.py's results.

Nothing here measures: ``write(results, path)`` turns the results (as written to
``bench/results/throughput.json``) into Markdown and replaces the section with
``common.write_section``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import BACKWARD_FACTOR, BENCHMARKS, write_section

HEADING = "## Speed"
# The protocol the text describes; bench/throughput.py measures with these.
NUM_IMAGES, TUTORIAL_BATCH, MATMUL_SIZE = 5_000, 128, 2048
ISSUE_IMAGES_PER_S, ISSUE_TRAIN_GFLOP = 18.0, 5.4  # issue 2: the notebook on a 2-core machine
BUSY_LOAD = 1.5  # 1-minute load average above which other jobs probably shared the CPU
BUSY_OTHERS = 0.2  # cores used by other processes, on average, above which a run counts as busy


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def busy_reasons(results: dict[str, Any]) -> list[str]:
    machine, reasons = results["machine"], []
    if machine["load_start"] > BUSY_LOAD:
        reasons.append(f"load average {machine['load_start']} at start")
    for part, use in results["others"].items():
        if busy_cores(use) > BUSY_OTHERS:
            reasons.append(
                f"other processes used {busy_cores(use):.2f} cores during the {part} part"
            )
    return reasons


def busy_warning(reasons: list[str]) -> str:
    return (
        f"> **Warning: the machine was busy** ({'; '.join(reasons)}): other jobs shared the 2 "
        "cores, so the absolute numbers are low and noisy. Compared loops ran interleaved, so "
        "the comparisons between them hold better than the absolute numbers.\n"
    )


def others_text(others: dict[str, dict[str, float]]) -> str:
    return ", ".join(
        f"{use['other_cores']:.2f} cores ({use['steal_cores']:.2f} steal) during the {part} part"
        for part, use in others.items()
    )


def machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    lines = [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable), torch {machine['torch']} on CPU with "
        f"{machine['torch_threads']} threads, Python {machine['python']}",
        f"- Date: {machine['date']}; command: `{machine['command']}`",
        f"- 1-minute load average: {machine['load_start']} at start, {machine['load_end']} at "
        "end (the end value includes this benchmark's own 2 threads)",
        f"- Other processes kept busy on average: {others_text(results['others'])} "
        "(`/proc/stat` busy time minus this process's CPU time)",
        f"- Float32 matmul peak ({MATMUL_SIZE}x{MATMUL_SIZE} `torch.mm`, best of "
        f"{machine['matmul_reps']}): {fmt(machine['peak_gflops'])} GFLOP/s "
        f"(start {fmt(machine['peak_start'])}, end {fmt(machine['peak_end'])})",
    ]
    reasons = busy_reasons(results)
    return [busy_warning(reasons), *lines] if reasons else lines


def tutorial_markdown(t: dict[str, Any]) -> list[str]:
    tr, sa, fl = t["training"], t["sampling"], t["flops"]
    overhead = t["trainer_overhead"]
    verdict = "under" if overhead < 0.05 else "**above**"
    rows = [
        "| loop | training img/s | step (s) | sampling img/s (16 steps) "
        f"| batch of {t['batch_size']} (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("bare", "bare PyTorch loop (the notebook)"), ("difflab", "difflab")):
        rows.append(
            f"| {label} | {fmt(tr[name]['images_per_s'])} | {fmt(tr[name]['median_step_s'], 2)} "
            f"| {fmt(sa[name]['images_per_s'])} | {fmt(sa[name]['median_step_s'], 1)} |"
        )
    return [
        f"### Tutorial network, batch {t['batch_size']}, CPU (issue 2)",
        "",
        f"`tutorial` preset: {t['parameters']:,} parameters, L1 next-step objective, Adam 8e-4, "
        f"{NUM_IMAGES:,} synthetic 32x32 images. Medians over {tr['bare']['steps']} training "
        f"steps and {sa['bare']['steps']} sampling runs per loop, bare and difflab interleaved.",
        "",
        *rows,
        "",
        f"- **Trainer overhead** (1 - difflab / bare, median steps): **{overhead:+.1%}**, "
        f"{verdict} the 5% target (from total times: {t['trainer_overhead_mean']:+.1%}).",
        f"- Issue 2's reference: about {ISSUE_IMAGES_PER_S:g} training img/s for the notebook on "
        f"a 2-core machine; difflab here: {fmt(tr['difflab']['images_per_s'])} img/s.",
        f"- FLOPs: one forward pass costs {fl['forward_gflop_per_image']:.2f} GFLOP per image "
        f"(`forward_gflops`); assuming forward + backward = {BACKWARD_FACTOR:g} forwards, a "
        f"training image costs {fl['train_gflop_per_image']:.2f} GFLOP (the issue says "
        f"{ISSUE_TRAIN_GFLOP:g}).",
        f"- Achieved: {fmt(fl['achieved_gflops'])} GFLOP/s by difflab "
        f"({fmt(t['bare_achieved_gflops'])} by the bare loop), **{fl['fraction_of_peak']:.0%} "
        f"of the measured matmul peak** ({t['bare_fraction_of_peak']:.0%} for the bare loop).",
        "",
    ]


def variant_cell(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"failed: `{result['error'][:80]}`"
    return fmt(result["images_per_s"])


def compile_cell(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return "failed"
    return fmt(result["compile_s"], 0)


def busy_cores(use: dict[str, float]) -> float:
    return use["other_cores"] + use["steal_cores"]


def others_cell(use: dict[str, float]) -> str:
    cores = busy_cores(use)
    return f"**{cores:.2f} (busy)**" if cores > BUSY_OTHERS else f"{cores:.2f}"


def variant_names(rows: list[dict[str, Any]]) -> list[str]:
    """The variants measured, in the order throughput.py ran them."""
    return list(rows[0]["variants"]) if rows else []


def speed_table(rows: list[dict[str, Any]]) -> list[str]:
    names = variant_names(rows)
    lines = [
        "| network | params | fwd GFLOP/img | batch | " + " | ".join(names) + " | others |",
        "|---|---:|---:|---:|" + "---:|" * len(names) + "---:|",
    ]
    for row in rows:
        cells = [variant_cell(row["variants"][name]) for name in names]
        lines.append(
            f"| {row['network']} | {row['parameters'] / 1e6:.2f}M | "
            f"{row['forward_gflop_per_image']:.2f} | {row['batch_size']} | "
            + " | ".join([*cells, others_cell(row["others"])])
            + " |"
        )
    return lines


def compile_table(rows: list[dict[str, Any]]) -> list[str]:
    compiled = [name for name in variant_names(rows) if "compile" in name]
    lines = ["| network | " + " | ".join(compiled) + " |", "|---|" + "---:|" * len(compiled)]
    for row in rows:
        cells = [compile_cell(row["variants"][name]) for name in compiled]
        lines.append(f"| {row['network']} | " + " | ".join(cells) + " |")
    return lines


def networks_markdown(rows: list[dict[str, Any]]) -> list[str]:
    return [
        "### Every network, training on CPU (issue 4)",
        "",
        "Training images/s of difflab's trainer step (forward, backward, Adam, EMA where the "
        "preset has one) at each preset's batch size; medians over the timed steps. *others*: "
        "cores that other processes kept busy, on average, while the row was measured; even "
        "one busy core slows a 2-thread step several times, so a busy row is not comparable "
        "with the others.",
        "",
        *speed_table(rows),
        "",
        "Compile time (s): first step minus a normal step.",
        "",
        *compile_table(rows),
        "",
    ]


def method_lines() -> list[str]:
    return [
        "### How this was measured",
        "",
        "- `bench/throughput.py`; raw step times in `bench/results/throughput.json`.",
        f"- The bare loop is the notebook's code: random batch of {TUTORIAL_BATCH} from a float "
        "tensor, one "
        "noise tensor, img_a and img_b at levels t and t+1 of `1 - linspace(0, 1, 17)`, L1 "
        "loss, Adam, `zero_grad / backward / step`. difflab's step is `Trainer.train_step` "
        "(with its EMA update, none for the tutorial) and `Trainer.read_back` of its loss; "
        "logging, pictures and checkpoints are not timed.",
        "- Sampling: the bare loop runs `x = model(x, i)` for i = 0..15 under `no_grad`; "
        "difflab runs `difflab.sampling.generate` with the tutorial sampler (as `Run.sample`).",
        "- Images/s come from the median step, which is robust to bursts of other jobs; the "
        "JSON also has the rate from total time.",
        "- `torch.compile` uses the default inductor backend with a fresh cache directory, so "
        "compile times are cold; *compile + channels_last* compiles right after *compile* on "
        "the same network and reuses part of its work. edm-paper's preset batch (128) is meant "
        "for a GPU; it runs at 8 here.",
        "",
    ]


def speed_section(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        HEADING,
        "",
        f"_Written by `bench/throughput.py` ({machine['date']}); rerun it to update this section._",
        "",
        *machine_lines(results),
        "",
    ]
    if "tutorial" in results:
        lines += tutorial_markdown(results["tutorial"])
    if "networks" in results:
        lines += networks_markdown(results["networks"])
    if "tutorial" in results and "networks" in results:
        lines += noise_lines(results["tutorial"], results["networks"])
    return "\n".join([*lines, *method_lines()])


def noise_lines(tutorial: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The same configuration measured twice: a yardstick for differences between cells."""
    row = next((r for r in rows if r["preset"] == "tutorial"), None)
    if row is None or row["variants"]["eager"]["status"] != "ok":
        return []
    first = tutorial["training"]["difflab"]["images_per_s"]
    second = row["variants"]["eager"]["images_per_s"]
    return [
        f"Measurement noise: the tutorial's *eager* cell and the difflab row of the issue 2 "
        f"table are the same configuration, measured minutes apart: {fmt(second)} vs "
        f"{fmt(first)} img/s ({second / first - 1:+.0%}). Differences of that size between "
        "cells are not significant.",
        "",
    ]


def write(results: dict[str, Any], path: Path = BENCHMARKS) -> Path:
    """Replace (or append) the "## Speed" section of ``path``; other sections are kept."""
    return write_section(HEADING, speed_section(results), path)
