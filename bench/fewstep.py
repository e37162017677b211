"""One- and two-step generation (issue 16): a consistency model distilled from the 30-minute CPU
winner, against that teacher at few network evaluations.

Resumable pieces; results land in bench/results/fewstep/*.json, ``report`` writes the
"## One and two steps" section of docs/benchmarks.md and its FID-against-evaluations plot.

    python bench/fewstep.py distill     # the student: difflab distill TEACHER, 30 CPU-minutes
    python bench/fewstep.py student     # FID-1k and KID at 1, 2 and 4 steps, sampling img/s
    python bench/fewstep.py teacher     # the teacher at 1-35 evaluations (iPNDM, DPM-Solver++,
                                        # Heun), sampling img/s
    python bench/fewstep.py report
    python bench/fewstep.py all

The teacher is ``--teacher RUN``: by default the 30-minute ``flow-cpu`` run on the cars that
bench/conditional.py trains (``bench/out/conditional/runs/cars``). Run nothing else heavy while
``distill`` runs: its budget is wall-clock on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import quality
from common import BENCHMARKS, ROOT, matmul_peak, write_section
from quality_setup import DEFAULT_DATA, Settings, difflab, save

STUDENT_STEPS = [1, 2, 4]
# (sampler, steps): 1, 2, 4, 10 and 35 network evaluations with the solvers that do best there.
TEACHER_ROWS = [("ipndm", 1), ("ipndm", 2), ("ipndm", 4), ("dpm++2m", 4), ("ipndm", 10),
                ("heun", 18)]  # fmt: skip
HEADING = "## One and two steps"


class FewStepSettings(Settings):
    """quality.py's settings, with this benchmark's folders and bench/conditional.py's car
    reference (the 5,000 training cars)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        name = "fewstep-quick" if args.quick else "fewstep"
        self.out = ROOT / "bench" / "out" / name
        self.results = self.out / "results" if args.quick else ROOT / "bench" / "results" / name
        self.teacher = Path(args.teacher)
        self.reference = Path(args.ref)

    @property
    def ref(self) -> Path:
        return self.reference


def piece_distill(settings: Settings) -> None:
    """``difflab distill`` for the budget, in chunks (each a kept checkpoint)."""
    run_dir, chunk = settings.run_dir("student"), settings.minutes / settings.chunks
    while (done := quality._elapsed_minutes(run_dir)) < settings.minutes - 0.01:
        limit = min(chunk, settings.minutes - done)
        if (run_dir / "config.json").exists():
            difflab(settings, "train", "--resume", run_dir, "--time-limit", limit, "--no-progress")
            continue
        difflab(
            settings, "distill", settings.teacher, "--out", run_dir, "--time-limit", limit,
            "--set", "train.keep_last=1000", "--set", "train.checkpoint_every=1000000000",
            "--set", "train.sample_every_kimg=0", "--set", "train.steps=1000000000",
            "--no-progress",
        )  # fmt: skip


def _score(settings: Settings, run: Path, *extra: object) -> dict:
    out = settings.out / "evals" / f"{run.name}-{time.time_ns()}.json"
    started = time.monotonic()
    difflab(settings, "eval", run, "--ref", settings.ref, "--num", settings.num, "--json", out,
            *extra)  # fmt: skip
    result = json.loads(out.read_text())
    return {"fid": result["fid"], "kid": result["kid_mean"], "kid_std": result["kid_std"],
            "evaluations": result["evaluations"], "eval_seconds": time.monotonic() - started}  # fmt: skip


def _rate(run_dir: Path, sampler: str | None, steps: int, num: int = 100) -> float:
    """Sampling images/s of ``num`` images in-process, after a warm-up batch."""
    from difflab.api import load_run

    run = load_run(run_dir, device="cpu")
    plan = run.plan(sampler, steps)
    run.generate(2, plan=plan)
    started = time.monotonic()
    run.generate(num, plan=plan)
    return num / (time.monotonic() - started)


def _rows(settings: Settings, piece: str, wanted, measure) -> None:
    path = settings.result(piece)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for sampler, steps in wanted:
        if any(r["sampler"] == sampler and r["steps"] == steps for r in rows):
            continue
        rows.append({"sampler": sampler, "steps": steps, **measure(sampler, steps)})
        save(path, {"rows": rows})


def piece_student(settings: Settings) -> None:
    student = settings.run_dir("student")

    def measure(sampler, steps):
        return {**_score(settings, student, "--steps", steps),
                "images_per_s": _rate(student, None, steps)}  # fmt: skip

    _rows(settings, "student", [("consistency", k) for k in STUDENT_STEPS], measure)


def piece_teacher(settings: Settings) -> None:
    def measure(sampler, steps):
        return {**_score(settings, settings.teacher, "--sampler", sampler, "--steps", steps),
                "images_per_s": _rate(settings.teacher, sampler, steps)}  # fmt: skip

    _rows(settings, "teacher", TEACHER_ROWS, measure)


def piece_report(settings: Settings) -> None:
    from report_fewstep import section

    values = {piece: json.loads(settings.result(piece).read_text())["rows"]
              for piece in ("student", "teacher") if settings.result(piece).exists()}  # fmt: skip
    values["distill_minutes"] = quality._elapsed_minutes(settings.run_dir("student"))
    values["teacher"] = values.get("teacher", [])
    values["matmul_peak_gflops"] = matmul_peak(10)  # this machine, measured now (keep it quiet)
    target = settings.out / "benchmarks.md" if settings.quick else BENCHMARKS
    figures = settings.out if settings.quick else ROOT / "docs" / "figures"
    print(f"wrote {write_section(HEADING, section(values, settings, figures), target)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=["distill", "student", "teacher", "report", "all"])
    parser.add_argument(
        "--teacher", default=ROOT / "bench" / "out" / "conditional" / "runs" / "cars"
    )
    parser.add_argument("--ref", default=ROOT / "bench" / "out" / "conditional" / "ref-cars.npz")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    args = parser.parse_args()
    args.curve_num, args.max_minutes = 0, float("inf")
    settings = FewStepSettings(args)
    pieces = {"distill": piece_distill, "student": piece_student, "teacher": piece_teacher,
              "report": piece_report}  # fmt: skip
    for name in list(pieces) if args.piece == "all" else [args.piece]:
        pieces[name](settings)


if __name__ == "__main__":
    main()
