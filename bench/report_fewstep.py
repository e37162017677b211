"""bench/fewstep.py's results as the "## One and two steps" section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

from difflab.viz import plot_lines

FIGURE = "fewstep.png"
START_SIGMA = 10.0  # a 1-step sample's start that beat 80 in start-screen.json
START_KEY = f"1 from {START_SIGMA:g}"  # a lever row's score of 1 step from there
TARGETS = {2: 0.15, 1: 0.35}  # issue 16: FID-1k within 15% (2 evaluations), 35% (1) of the
# teacher's at 35 evaluations


#: What the screens found and what to try next: prose, kept beside the results it reads.
FINDINGS = Path(__file__).parent / "results" / "fewstep" / "findings.md"


def _longer(values: dict) -> list[str]:
    """What length gave: the same run resumed from one budget to the next (LENGTHS)."""
    kept = [(images, values[piece]) for piece, images in LENGTHS if values.get(piece)]
    if len(kept) < 2:
        return []
    moves = []
    for evaluations in STUDENT_STEPS:
        fids = [next((r["fid"] for r in rows if r["evaluations"] == evaluations), None)
                for _, rows in kept]  # fmt: skip
        if None not in fids:
            moves.append(f"{' -> '.join(f'{f:.1f}' for f in fids)} at {evaluations}")
    budgets = " -> ".join(f"{images:,}" for images, _ in kept)
    return [f"Length, the same run resumed bit-exactly ({budgets} images): FID-1k "
            f"{'; '.join(moves)} evaluation(s).", ""]  # fmt: skip


STUDENT_STEPS = [1, 2, 4]
#: The benchmark's student: the trunk ("student", a constant rate) cooled down from 240,000 images.
FINAL = "student-cool"
#: The trunk's results at each budget it was scored at (results piece, images), in order.
LENGTHS = [("student-80k", 80_000), ("student-160k", 160_000), ("student-240k", 240_000),
           ("student", 300_000)]  # fmt: skip
#: The rows of the table: (results piece, who).
MODELS = [
    (FINAL, "student: constant rate to 240,000 images, then cooled down over 60,000"),
    ("student", "the same run at its constant rate to 300,000 images (the control)"),
    ("student-240k", "the same run at 240,000 images"),
    ("student-160k", "the same run at 160,000 images"),
    ("student-80k", "the same run at 80,000 images"),
    ("student-lr1e-4", "student, last session (Adam 1e-4, unguided teacher, 48,000 images)"),
    ("student-edm-base", "student on EDM's base"),
    ("teacher", "teacher"),
    ("teacher-ag", "teacher, autoguided (w = 2)"),
]


#: The 2-step students whose second level was searched: (results piece suffix, who).
LEVELS = [
    ("", "student"),
    ("-240k", "student's run at 240,000 images"),
    ("-160k", "student's run at 160,000 images"),
    ("-lr1e-4", "student of an earlier session (Adam 1e-4, unguided teacher)"),
]


def section(values: dict, settings, figures: Path) -> str:
    student, teacher = values.get(FINAL, []), values["teacher"]
    distill = values["distill"]  # written with the final student's sampling rates
    lines = [
        "## One and two steps",
        "",
        f"_Written by `bench/fewstep.py report`; teacher `{settings.teacher.name}` (flow-cpu as it "
        "was before issue 14: 64 channels, batch 32, a constant rate; 30 minutes on the cars), "
        f"student distilled from it on {distill['images']:,} images ({distill['minutes']:.1f} "
        "minutes on the machine below; the rate cooled down over the last fifth, below) with "
        "`difflab distill` (consistency distillation, section 2.8 of docs/methods.md) and the "
        f"settings of lever `{values['student_lever']}` below._",
        "",
        "1,000 samples each, FID-1k and KID against the 5,000 training cars, as in the quality "
        "benchmark. Sampling images/s: 100 images in-process on this CPU after a warm-up "
        f"(fp32 matmul peak {distill['matmul_peak_gflops']:.0f} GFLOP/s, measured on the same "
        f"machine, {distill['machine']}, {distill['date']}). The autoguided teacher is guided "
        "by its own EMA weights at step 980 of 3,044 (a third of its training), the student's "
        "teacher.",
        "",
        "| model | sampler | network evaluations | FID-1k | KID | sampling img/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for piece, who in MODELS:
        for r in sorted(values.get(piece, []), key=lambda r: (r["evaluations"], r["sampler"])):
            lines.append(
                f"| {who} | {r['sampler']} {r['steps']} | {r['evaluations']} | {r['fid']:.1f} | "
                f"{r['kid']:.4f} ± {r['kid_std']:.4f} | {r['images_per_s']:.1f} |"
            )
    if values.get("student-edm-base"):
        lines += ["", "\"Student on EDM's base\": the same distillation before the student was built "
                  "on its teacher's process (flow), i.e. on EDM's preconditioning with the flow "
                  "network's weights, which mean something else there; 30 minutes (49,920 images) "
                  "at the discretisation curriculum 10 to 1,280 levels and Adam 1e-3. Kept for "
                  "comparison (bench/results/fewstep/student-edm-base.json)."]  # fmt: skip
    lines += [
        "",
        *_levers(values.get("levers", [])),
        *_longer(values),
        *_cooldown(values),
        *_targets(student, teacher + values.get("teacher-ag", []), values.get("levels", [])),
        *[line for suffix, who in LEVELS for line in _levels(values.get(f"levels{suffix}"), who)],
        *_plot(values, figures),
        *_pictures(student, figures),
        *([FINDINGS.read_text()] if student else []),
    ]
    return "\n".join(lines) + "\n"


#: The teachers other than the benchmark's that lever rows were distilled from (``--teacher``).
#: Name: (what it is, what its rows' minutes compare with).
OTHER, ALONE = (
    "a teacher other than the benchmark's",
    "their minutes compare with each other's only",
)
OTHER_TEACHERS = {
    "teacher-old": (
        "the teacher's recipe trained again on a later session's CPU (autoguided FID-1k 44.2 "
        "against the benchmark teacher's 43.2, bench/results/fewstep/start-screen.json), on "
        "other machines, partly beside other work",
        "their minutes do not compare with the other rows' or each other's",
    ),
    "teacher-1k": (
        "the teacher's recipe stopped at 1,000 of its 3,044 steps, its guide the EMA at step 322 "
        "(the same third), trained for the dropout screen on one machine, where its first two "
        "rows ran alone (autoguided FID-1k 66.5 at Heun 9, w = 2, against the benchmark "
        "teacher's 43.2, bench/results/fewstep/teacher-1k-ag.json); `ct-pm0` ran in a later "
        "session beside a probe of the command line and the test suite, so its minutes and "
        "matmul peak do not compare",
        "the first two rows' minutes compare with each other's only",
    ),
}


def _levers(rows: list[dict]) -> list[str]:
    """Distillation settings screened on a shorter budget (bench/fewstep.py lever NAME)."""
    if not rows:
        return []
    lines = ["Distillation settings screened on a shorter budget (`python bench/fewstep.py lever "
             "NAME --images N`, each a distillation of the same teacher, scored at 1 and 2 steps; a "
             "longer row of a lever is its shorter run gone on, bit-exactly; `base` is the last "
             "session's student settings):", "",
             "| lever | settings (`--set`, flags) | images | minutes here | FID-1k, 1 step | FID-1k, "
             "1 step from sigma 10 | FID-1k, 2 steps | KID, 2 steps |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        sets = ", ".join(_setting(item, r.get("guide", 980)) for item in r["sets"]) or "-"
        one, two = r["scores"]["1"], r["scores"]["2"]
        lever = f"`{r['lever']}`" + (f", `{r['teacher']}`*" if r.get("teacher") else "")
        start = f"{r['scores'][START_KEY]['fid']:.1f}" if START_KEY in r["scores"] else "-"
        lines.append(f"| {lever} | {sets} | {r['images']:,} | {r['minutes']:.1f} | "
                     f"{one['fid']:.1f} | {start} | {two['fid']:.1f} | {two['kid']:.4f} |")  # fmt: skip
    peaks: dict[str, list[float]] = {}
    for r in rows:
        if r.get("teacher"):
            peaks.setdefault(r["teacher"], []).append(r["matmul_peak_gflops"])
    for name, measured in peaks.items():
        shown = ", ".join(f"{peak:.0f}" for peak in measured)
        note, minutes = OTHER_TEACHERS.get(name, (OTHER, ALONE))
        lines += ["", f"\\* Distilled from `{name}`, {note} (fp32 matmul peak {shown} GFLOP/s, "
                  f"row by row): {minutes}."]  # fmt: skip
    return [*lines, ""]


def _setting(item: str, guide: int) -> str:
    """A lever's item as the table shows it: the last part of a --set key, or a flag."""
    if item.startswith("--"):
        return f"`{item}`"
    if "{" in item:
        return f"`teacher_guide=` its step {guide}"
    key, value = item.split("=", 1)
    return f"`{key.split('.')[-1]}={value}`"


def _levels(rows: list[dict] | None, who: str) -> list[str]:
    """The 2-step student with its second level moved (bench/fewstep.py levels); the default
    and the best level scored again on other seeds where that was done."""
    if not rows:
        return []
    again = {r["rho"]: r for r in rows if r.get("seed", 0) != 0}
    lines = [f"The second noise level of the 2-step {who} (`difflab sample RUN --steps 2 --rho R`; "
             "the first is 80; Song et al. 2023 chose theirs by search)"
             + (", with the default and the best level scored again on 1,000 other images "
                "(`--seed 1`), since the search chose on the first 1,000:" if again else ":"),
             "", "| rho | second level (sigma) | FID-1k | KID |" + (" FID-1k, seed 1 | KID, seed 1 |"
             if again else ""), "|---:|---:|---:|---:|" + ("---:|---:|" if again else "")]  # fmt: skip
    for r in sorted((r for r in rows if r.get("seed", 0) == 0), key=lambda r: r["rho"]):
        line = f"| {r['rho']:g} | {r['level']:.2f} | {r['fid']:.1f} | {r['kid']:.4f} |"
        if again:
            other = again.get(r["rho"])
            line += f" {other['fid']:.1f} | {other['kid']:.4f} |" if other else " - | - |"
        lines.append(line)
    return [*lines, ""]


def grid(steps: int, name: str = "student") -> str:
    """The file name of a student's 64 samples at ``steps`` steps."""
    return f"fewstep-{name}-{steps}.png"


def _pictures(student: list[dict], figures: Path) -> list[str]:
    shown = [r["steps"] for r in sorted(student, key=lambda r: r["steps"])]
    shown = [k for k in shown if (figures / grid(k, FINAL)).exists()]
    if not shown:
        return []
    lines = ["The student's samples, the same 64 seeds at " + ", ".join(map(str, shown))
             + " step(s):", ""]  # fmt: skip
    return lines + [f"![student, {k} step(s)](figures/{grid(k, FINAL)})" for k in shown] + [""]


def _cooldown(values: dict) -> list[str]:
    """The cool-down against its control: the same 60,000 images at the constant rate."""
    cooled, control, start = (values.get(piece) for piece in (FINAL, "student", "student-240k"))
    if not (cooled and control and start):
        return []

    def fids(rows: list[dict]) -> str:
        by = {r["evaluations"]: r["fid"] for r in rows}
        return " / ".join(f"{by[k]:.1f}" for k in STUDENT_STEPS if k in by)

    return [f"Cool-down (`bench/fewstep.py cooldown`; warm-up, stable, decay, Hägele et al. 2024): "
            f"the run at 240,000 images, {fids(start)} FID-1k at 1 / 2 / 4 evaluations, went on "
            f"for 60,000 more images either at its constant rate (the control: {fids(control)}) "
            f"or with the rate falling linearly to 0 (a branch resumed with `--set "
            f"train.lr_schedule='cooldown'`, which the trainer accepts because no step taken "
            f"changes its rate: {fids(cooled)}). The cooled branch is the student above.", ""]  # fmt: skip


def _targets(student: list[dict], teacher: list[dict], levels: list[dict]) -> list[str]:
    """Against the teacher's best at about 35 evaluations (plain Heun 35 or autoguided 34); at
    2 evaluations also with the second level the search chose, scored on other seeds."""
    near = [r for r in teacher if 34 <= r["evaluations"] <= 35]
    if not near or not student:
        return []
    full = min(near, key=lambda r: r["fid"])
    name = f"{full['sampler']} {full['steps']}, {full['evaluations']} evaluations"
    lines = []
    for evaluations, margin in TARGETS.items():
        row = next((r for r in student if r["evaluations"] == evaluations), None)
        if row is None:
            continue
        ratio = row["fid"] / full["fid"] - 1
        met = "met" if ratio <= margin else "**not met**"
        plain = next((r for r in near if r is not full and r["evaluations"] == 35), None)
        also = "" if plain is None else (
            f" Against the plain (unguided) teacher at 35, {plain['fid']:.1f}, it would be "
            f"{row['fid'] / plain['fid'] - 1:+.0%}; the student learned the guided ODE, so the "
            "guided teacher is the one it is measured against."
        )  # fmt: skip
        lines.append(
            f"- {evaluations} evaluation(s): student FID-1k {row['fid']:.1f} against the "
            f"teacher's best near 35 evaluations, {full['fid']:.1f} ({name}) "
            f"({ratio:+.1%}; target at most {margin:+.0%}): {met}.{also}"
        )
    lines += _held_out_default(levels, full, TARGETS[2])
    lines += _searched_level(levels, full, TARGETS[2])
    four = next((r for r in student if r["evaluations"] == 4), None)
    if four is not None:
        lines.append(
            f"- 4 evaluations: student FID-1k {four['fid']:.1f} ({four['fid'] / full['fid'] - 1:+.0%})."
        )
    lines.append(
        "- For scale: 1,000 real CIFAR-10 test cars score FID-1k 24.1 against the training cars "
        "(issue 5), the floor of this metric at n = 1,000."
    )
    fastest = max(student, key=lambda r: r["images_per_s"])
    lines.append(
        f"- Speed: the 1-step student samples {fastest['images_per_s']:.1f} img/s against the "
        f"teacher's {full['images_per_s']:.1f} ({name}) "
        f"({fastest['images_per_s'] / full['images_per_s']:.0f}x)."
    )
    return [*lines, ""]


def _held_out_default(levels: list[dict], full: dict, margin: float) -> list[str]:
    """The 2-step student at its default level on 1,000 other images (the levels' seed 1)."""
    held = next((r for r in levels if r["rho"] == 7.0 and r.get("seed", 0) != 0), None)
    if held is None:
        return []
    ratio = held["fid"] / full["fid"] - 1
    first = {r["rho"]: r["fid"] for r in levels if r.get("seed", 0) == 0}
    gaps = [
        abs(r["fid"] - first[r["rho"]]) for r in levels if r.get("seed", 0) and r["rho"] in first
    ]
    return [
        f"- 2 evaluations at the default level on 1,000 other images (`--seed 1`): FID-1k "
        f"{held['fid']:.1f}, {ratio:+.1%}: {'met' if ratio <= margin else '**not met**'} on "
        f"those images (the two sets of 1,000 differ by {min(gaps):.1f} to {max(gaps):.1f} at "
        "the levels scored on both)."
    ]


def _searched_level(levels: list[dict], full: dict, margin: float) -> list[str]:
    again = {r["rho"]: r for r in levels if r.get("seed", 0) != 0}
    best = min((r for r in levels if r.get("seed", 0) == 0), key=lambda r: r["fid"], default=None)
    if best is None or best["rho"] not in again or 7.0 not in again:
        return []
    held, default = again[best["rho"]], again[7.0]
    ratio = held["fid"] / full["fid"] - 1
    return [
        f"- 2 evaluations with the second level the search chose (`--rho {best['rho']:g}`, sigma "
        f"{best['level']:.2f}): FID-1k {best['fid']:.1f} on the searched seeds, "
        f"{held['fid']:.1f} on 1,000 other images (`--seed 1`, against {default['fid']:.1f} "
        f"there at the default level), {ratio:+.0%} of the teacher's {full['fid']:.1f}: "
        f"{'met' if ratio <= margin else '**not met**'} with that level (the level is a sampling "
        "option; the student's default stays rho = 7)."
    ]


def _plot(values: dict, figures: Path) -> list[str]:
    teacher = values["teacher"]
    series = {}
    for name, rows in [
        ("student (consistency), cooled down, 300,000 images", values.get(FINAL, [])),
        ("student's run, constant rate, 300,000 images", values.get("student", [])),
        ("student's run at 160,000 images", values.get("student-160k", [])),
        ("student's run at 80,000 images", values.get("student-80k", [])),
        ("student, last session", values.get("student-lr1e-4", [])),
        ("student on EDM's base", values.get("student-edm-base", [])),
        ("teacher autoguided, heun", values.get("teacher-ag", [])),
    ] + [
        (f"teacher, {s}", [r for r in teacher if r["sampler"] == s])
        for s in sorted({r["sampler"] for r in teacher})
    ]:
        rows = sorted(rows, key=lambda r: r["evaluations"])
        if rows:
            series[name] = ([r["evaluations"] for r in rows], [r["fid"] for r in rows])
    plot_lines(series, figures / FIGURE, xlabel="network evaluations per image", ylabel="FID-1k",
               logy=True, logx=True)  # fmt: skip
    return [f"![FID-1k against network evaluations](figures/{FIGURE})", ""]
