"""bench/fewstep.py's results as the "## One and two steps" section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

from difflab.viz import plot_lines

FIGURE = "fewstep.png"
TARGETS = {2: 0.15, 1: 0.35}  # issue 16: FID-1k within 15% (2 evaluations), 35% (1) of the
# teacher's at 35 evaluations


NEXT = (
    "The student starts as its teacher's denoiser (a flow student on flow's process, section "
    "2.8), which is what made it work: on EDM's base the same budget gave 3-4 times the FID. "
    "Its consistency loss was still falling when the budget ended (the run's log.jsonl). What "
    "I would try next: a longer distillation; Song et al.'s LPIPS distance in place of the "
    "pseudo-Huber one (their distillation results use it); an EMA target network; ECT's and "
    "sCM's continuous-time objectives."
)


def section(values: dict, settings, figures: Path) -> str:
    student, teacher = values.get("student", []), values["teacher"]
    lines = [
        "## One and two steps",
        "",
        f"_Written by `bench/fewstep.py report`; teacher `{settings.teacher.name}` (flow-cpu, 30 "
        f"minutes on the cars), student distilled from it on {values['distill_images']:,} images "
        f"({values['distill_minutes']:.1f} minutes on this machine) with `difflab distill` "
        "(consistency distillation, section 2.8 of docs/methods.md)._",
        "",
        "1,000 samples each, FID-1k and KID against the 5,000 training cars, as in the quality "
        "benchmark. Sampling images/s: 100 images in-process on this CPU after a warm-up "
        f"(fp32 matmul peak {values.get('matmul_peak_gflops', 0):.0f} GFLOP/s, measured by the "
        "report on the same machine).",
        "",
        "| model | sampler | network evaluations | FID-1k | KID | sampling img/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    before = values.get("student-edm-base", [])  # the student on EDM's base (before the fix)
    for who, rows in (
        ("student", student),
        ("student on EDM's base", before),
        ("teacher", teacher),
    ):
        for r in sorted(rows, key=lambda r: (r["evaluations"], r["sampler"])):
            lines.append(
                f"| {who} | {r['sampler']} {r['steps']} | {r['evaluations']} | {r['fid']:.1f} | "
                f"{r['kid']:.4f} ± {r['kid_std']:.4f} | {r['images_per_s']:.1f} |"
            )
    if before:
        lines += ["", "\"Student on EDM's base\": the same distillation before the student was built "
                  "on its teacher's process (flow), i.e. on EDM's preconditioning with the flow "
                  "network's weights, which mean something else there; 30 minutes (49,920 images) "
                  "at the discretisation curriculum 10 to 1,280 levels and Adam 1e-3. Kept for "
                  "comparison (bench/results/fewstep/student-edm-base.json)."]  # fmt: skip
    lines += [
        "",
        *([NEXT, ""] if student else []),
        *_targets(student, teacher),
        *_levels(values.get("levels", [])),
        *_plot(student, teacher, figures, before),
        *_pictures(student, figures),
    ]
    return "\n".join(lines) + "\n"


def _levels(rows: list[dict]) -> list[str]:
    """The 2-step student with its second level moved (bench/fewstep.py levels)."""
    if not rows:
        return []
    lines = ["The 2-step student's second noise level (`difflab sample RUN --steps 2 --rho R`; "
             "the first is 80; Song et al. 2023 chose theirs by search):", "",
             "| rho | second level (sigma) | FID-1k | KID |", "|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: r["rho"]):
        lines.append(f"| {r['rho']:g} | {r['level']:.2f} | {r['fid']:.1f} | {r['kid']:.4f} |")
    return [*lines, ""]


def grid(steps: int) -> str:
    """The file name of the student's 64 samples at ``steps`` steps."""
    return f"fewstep-student-{steps}.png"


def _pictures(student: list[dict], figures: Path) -> list[str]:
    shown = [r["steps"] for r in sorted(student, key=lambda r: r["steps"])]
    shown = [k for k in shown if (figures / grid(k)).exists()]
    if not shown:
        return []
    lines = ["The student's samples, the same 64 seeds at " + ", ".join(map(str, shown))
             + " step(s):", ""]  # fmt: skip
    return lines + [f"![student, {k} step(s)](figures/{grid(k)})" for k in shown] + [""]


def _targets(student: list[dict], teacher: list[dict]) -> list[str]:
    full = next((r for r in teacher if r["evaluations"] == 35), None)
    if full is None or not student:
        return []
    lines = []
    for evaluations, margin in TARGETS.items():
        row = next((r for r in student if r["evaluations"] == evaluations), None)
        if row is None:
            continue
        ratio = row["fid"] / full["fid"] - 1
        met = "met" if ratio <= margin else "**not met**"
        lines.append(
            f"- {evaluations} evaluation(s): student FID-1k {row['fid']:.1f} against the "
            f"teacher's {full['fid']:.1f} at 35 ({ratio:+.0%}; target at most {margin:+.0%}): {met}."
        )
    fastest = max(student, key=lambda r: r["images_per_s"])
    lines.append(
        f"- Speed: the 1-step student samples {fastest['images_per_s']:.1f} img/s against the "
        f"teacher's {full['images_per_s']:.1f} at 35 evaluations "
        f"({fastest['images_per_s'] / full['images_per_s']:.0f}x)."
    )
    return [*lines, ""]


def _plot(student: list[dict], teacher: list[dict], figures: Path, before: list[dict]) -> list[str]:
    series = {}
    for name, rows in [("student (consistency)", student), ("student on EDM's base", before)] + [
        (f"teacher, {s}", [r for r in teacher if r["sampler"] == s])
        for s in sorted({r["sampler"] for r in teacher})
    ]:
        rows = sorted(rows, key=lambda r: r["evaluations"])
        if rows:
            series[name] = ([r["evaluations"] for r in rows], [r["fid"] for r in rows])
    plot_lines(series, figures / FIGURE, xlabel="network evaluations per image", ylabel="FID-1k",
               logy=True, logx=True)  # fmt: skip
    return [f"![FID-1k against network evaluations](figures/{FIGURE})", ""]
