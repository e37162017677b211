"""Turn bench/gpu.py's gpu.json into the "## GPU" section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import BENCHMARKS, write_section

HEADING = "## GPU"
TARGET = 0.35  # issue 13: the paper-size U-Net at 35% of the bf16 matmul peak
PAPER = "edm-paper"
BASE = f"{PAPER}, batch 512, compiled"  # the base of the levers
CHECKS = ("paths", "cli", "fewstep")  # the parts whose rows are checks (ok or failed)


def _check_rows(rows: list[dict]) -> list[str]:
    lines = ["| check | result | seconds |", "|---|---|---:|"]
    for row in rows:
        if row["ok"]:
            details = ", ".join(
                f"{k} {_plain(v)}"
                for k, v in row.items()
                if k not in ("name", "ok", "seconds", "run")
            )
            result = f"ok ({details})" if details else "ok"
        else:
            result = f"**failed**: `{row['error'][:160]}`"
        lines.append(f"| {row['name']}{_run(row)} | {result} | {row['seconds']:.0f} |")
    return lines


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _variant(row: dict) -> str:
    parts = [row["autocast"] if row["autocast"] != "None" else "fp32/TF32"]
    if row["compile"]:
        parts.append(
            "compiled" + ("" if row["compile_mode"] == "default" else f" ({row['compile_mode']})")
        )
    if row.get("compile_layout") == "channels_last":  # "auto" (runs 1-5), "inductor": its own
        parts.append("channels-last graph")
    parts += [f"inductor {key}={value}" for key, value in row.get("inductor", {}).items()]
    parts += [f"{name} attention" for name in row.get("sdpa", [])]
    parts += [row["attention"]] if "attention" in row else []
    if row["channels_last"]:
        parts.append("channels_last")
    if not row["fused_optimizer"]:
        parts.append("foreach Adam")
    return ", ".join(parts)


def _speed_rows(rows: list[dict]) -> list[str]:
    lines = [
        "| run | preset | params | fwd GFLOP/img | batch | variant | img/s | TFLOP/s | % of bf16 peak | compile s |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row["ok"]:
            lines.append(
                f"| {row.get('run', 1)} | {row['name']} | | | | **failed**: `{row['error'][:120]}` | | | | |"
            )
            continue
        compile_s = f"{row['compile_s']:.0f}" if row["compile"] else ""
        lines.append(
            f"| {row.get('run', 1)} | {row['preset']} | {row['parameters'] / 1e6:.2f}M | {row['forward_gflop']:.2f} | "
            f"{row['batch']} | {_variant(row)} | {row['images_per_s']:,.0f} | "
            f"{row['tflops']:.1f} | {row['fraction_of_bf16_peak']:.1%} | {compile_s} |"
        )
    return lines


def _auto_lines(values: dict[str, Any]) -> list[str]:
    """Did ``precision = "auto"`` pick the faster of bf16 and fp32 for each preset?"""
    eager = {}
    for row in values.get("speed", []):
        if row["ok"] and not row["compile"] and row["precision"] in ("bf16", "fp32"):
            eager.setdefault(row["preset"], {})[row["precision"]] = row["images_per_s"]
    lines: list[str] = []
    if not values["machine"]["device"].startswith("cuda"):  # autocast is for CUDA only
        return lines
    for preset, picks_bf16 in values.get("auto_bf16", {}).items():
        rates = eager.get(preset, {})
        if len(rates) < 2:
            continue
        faster = max(rates, key=rates.get)
        picked = "bf16" if picks_bf16 else "fp32"
        verdict = "the faster" if picked == faster else f"**the slower** ({faster} is faster)"
        ratio = rates["bf16"] / rates["fp32"]
        lines.append(f"- `{preset}`: auto picks {picked}, {verdict}; bf16 / fp32 = {ratio:.2f}")
    return lines


def _lever_lines(values: dict[str, Any]) -> list[str]:
    """Each measured ``edm-paper`` variant against the row it adds one lever to in its own run
    (its name less the last ", lever"), else against batch 512 compiled (the base of the levers)
    of its own run, or of the latest run before it where its own run measured no base; a
    variant with neither is left out."""
    rows = [r for r in values.get("speed", []) if r["ok"] and r["preset"] == PAPER]
    bases = {r.get("run", 1): r for r in rows if r["name"] == BASE}
    named = {(r.get("run", 1), r["name"]): r for r in rows}
    lines = []
    for row in rows:
        run = row.get("run", 1)
        base = named.get((run, row["name"].rsplit(", ", 1)[0]))
        if base is None and bases:
            base = bases[max((k for k in bases if k <= run), default=min(bases))]
        if base is not None and row is not base:
            gain = row["images_per_s"] / base["images_per_s"] - 1
            lines.append(
                f"- batch {row['batch']}, {_variant(row)}{_run(row)}: {gain:+.1%} against "
                f"{base['images_per_s']:,.0f} img/s (batch {base['batch']}, {_variant(base)}{_run(base)})"
            )
    if not lines:
        return []
    return [
        f"Each lever against the row it adds to in the same run, else `{BASE}` (bf16) of the "
        "same run or of the run before:",
        "",
        *lines,
        "",
    ]


def _run(row: dict) -> str:
    return f" (run {row['run']})" if "run" in row else ""


def _kernel_lines(values: dict[str, Any]) -> list[str]:
    """Where the time of a profiled step goes (``gpu.py``'s ``kernel_shares``)."""
    what = "GPU kernels" if values["machine"]["device"].startswith("cuda") else "ATen operators"
    lines: list[str] = []
    for row in values.get("speed", []):
        kernels = row.get("kernels") if row["ok"] else None
        if not kernels or not kernels["families"]:
            continue
        families = ", ".join(f"{f} {share:.0%}" for f, share in kernels["families"].items())
        lines += [
            f"Where the time of one `{row['name']}` step{_run(row)} goes "
            f"({kernels['ms_per_step']:.1f} ms of {what} per step, `torch.profiler` over 3 "
            f"steps): {families}. The costliest:",
            "",
            *(f"- {share:.1%} `{name}`" for name, share in kernels["top"]),
            "",
        ]
        if kernels.get("launchers"):  # the operators (or compiled graphs) that launched them
            lines += [
                "The operators whose kernels cost most (their own GPU time, children excluded):",
                "",
                *(f"- {share:.1%} `{name}`" for name, share in kernels["launchers"]),
                "",
            ]
    return lines


def _target_line(values: dict[str, Any]) -> list[str]:
    rows = [r for r in values.get("speed", []) if r["ok"] and r["preset"] == PAPER]
    if not rows:
        return []
    best = max(rows, key=lambda r: r["fraction_of_bf16_peak"])
    met = "met" if best["fraction_of_bf16_peak"] >= TARGET else "**not met**"
    return [
        f"**Target** (issue 13: the paper-size U-Net at {TARGET:.0%} of the bf16 matmul peak "
        f"of one H100): {met} on {values['machine']['card']}; best `{PAPER}` row: "
        f"{_variant(best)}, batch {best['batch']}, "
        f"{best['images_per_s']:,.0f} img/s, {best['fraction_of_bf16_peak']:.1%} of the peak.",
        "",
    ]


def by_card(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of gpu.json as one ``merge`` per card, in the order each card first ran; rows keep
    their run's number in the whole list."""
    cards: dict[str, list[int]] = {}
    for number, values in enumerate(runs, 1):
        cards.setdefault(values["machine"]["card"], []).append(number)
    return [merge([runs[n - 1] for n in numbers], numbers) for numbers in cards.values()]


def merge(runs: list[dict[str, Any]], numbers: list[int] | None = None) -> dict[str, Any]:
    """Several gpu.json of one card (a later run measuring what an earlier one skipped) as one:
    the rows of all, each speed row against the peak measured in its own run (numbered 1, 2,
    ... or by ``numbers``)."""
    runs = [
        {**v, **{part: [{**r, "run": i} for r in v.get(part, [])] for part in (*CHECKS, "speed")}}
        for i, v in zip(numbers or range(1, len(runs) + 1), runs, strict=True)
    ]
    first, *later = runs
    merged: dict[str, Any] = {**first, "machine": {**first["machine"], "later": []}}
    for values in later:
        merged["machine"]["later"].append(values["machine"])
        for part in (*CHECKS, "speed"):
            merged[part] = merged.get(part, []) + values.get(part, [])
        merged["skipped"] = merged.get("skipped", []) + values.get("skipped", [])
    measured = {row["name"] for part in ("paths", "speed") for row in merged.get(part, [])}
    merged["skipped"] = [
        row
        for row in merged.get("skipped", [])
        if row["name"].removeprefix("speed of ").removeprefix("paths of ") not in measured
    ]
    return merged


def _runs_lines(m: dict[str, Any]) -> list[str]:
    runs = [m, *m.get("later", [])]
    peaks = " and ".join(f"{r['bf16_peak_tflops']:.0f}" for r in runs)
    commands = "; then ".join(
        f"`{r['command']}` ({r['date']}, deadline {r['minutes']:g} minutes)" for r in runs
    )
    return [
        f"_Written by `bench/gpu.py` on **{m['card']}**, torch {m['torch']}, CUDA {m['cuda']}; "
        f"host CPU {m['cpu']}. Commands: {commands}._",
        "",
        f"- bf16 matmul peak measured in the same run ({m['peak_matmul']}): **{peaks} TFLOP/s**"
        + (" (one per run; each row is against its own run's)" if len(runs) > 1 else "")
        + ". Achieved TFLOP/s = img/s x 3 x forward GFLOP per image (`forward_gflops`; "
        "backward counted as two forwards).",
    ]


def _scored(scored: dict[str, Any] | None) -> str:
    if not scored:
        return "."
    return (
        f": scored here, FID {scored['fid']:.1f} and KID {scored['kid_mean']:.4f} (n = "
        f"{scored['num_gen']} against {scored['num_ref']:,} reference images)."
    )


def section(values: dict[str, Any], *others: dict[str, Any]) -> str:
    """The section of one card's runs (``merge``), each other card's in a subsection after."""
    lines = [
        HEADING,
        "",
        *_runs_lines(values["machine"]),
        "- Images/s: `Trainer.train_step` timed over about 3 s after two warm-up steps, the GPU "
        "queue drained at both ends (losses read back once at the end, as the loop does at its "
        "log rows). Compile time: the first step minus a timed one.",
        "",
        *_card_lines(values, "###"),
    ]
    for other in others:
        m = other["machine"]
        lines += [f"### On {m['card']}", "", *_runs_lines(m), "", *_card_lines(other, "####")]
    return "\n".join(lines)


def _card_lines(values: dict[str, Any], level: str) -> list[str]:
    """One card's checks, speed, levers and profiles, under headings of ``level``."""
    lines: list[str] = []
    checks = [row for part in CHECKS for row in values.get(part, [])]
    if checks:
        lines += [f"{level} Every path on the GPU", "", *_check_rows(checks), ""]
    if values.get("speed"):
        lines += [f"{level} Training speed", "", *_speed_rows(values["speed"]), ""]
        lines += _target_line(values)
        lines += _lever_lines(values)
        lines += _kernel_lines(values)
        auto = _auto_lines(values)
        if auto:
            lines += ['`train.precision = "auto"` against the measured eager rows:', "", *auto, ""]
    skipped = [row["name"] for row in values.get("skipped", [])]
    if skipped:
        lines += [f"Not measured (deadline): {'; '.join(skipped)}.", ""]
    tar = next((r for r in values.get("cli", []) if r["ok"] and "tar" in r), None)
    if tar:
        lines += [
            f"Samples: {tar['images']} images of `flow-cpu` after {tar['step']} steps "
            f"({tar['sampler']}, {tar['images_per_s']:,.0f} img/s) in `{tar['tar']}`; score them "
            "on the CPU with `tar xf samples.tar && difflab eval samples --ref REF.npz`"
            + _scored(values.get("scored")),
            "",
        ]
    return lines


def write_report(cards: list[dict[str, Any]], path: Path = BENCHMARKS) -> Path:
    """The section from one run's values, or several runs' ``by_card``."""
    return write_section(HEADING, section(*cards), path)
