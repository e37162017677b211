"""One- and two-step generation (issue 16): a consistency model distilled from the 30-minute CPU
winner, against that teacher at few network evaluations.

Resumable pieces; results land in bench/results/fewstep/*.json, ``report`` writes the
"## One and two steps" section of docs/benchmarks.md and its FID-against-evaluations plot.

    python bench/fewstep.py distill     # the trunk: difflab distill TEACHER at a constant rate,
                                        # 300,000 images, the settings of LEVERS[STUDENT]
    python bench/fewstep.py student     # FID-1k and KID at 1, 2 and 4 steps, sampling img/s
    python bench/fewstep.py cooldown    # the student: the trunk branched at 240,000 images and
                                        # cooled down over 60,000 more (COOLDOWN), scored so
    python bench/fewstep.py teacher     # the teacher at 1-35 evaluations (iPNDM, DPM-Solver++,
                                        # Heun; autoguided Heun), sampling img/s
    python bench/fewstep.py levels      # the 2-step student's intermediate level (--rho)
    python bench/fewstep.py lever NAME --images 12000  # a distillation setting (LEVERS) on
                                        # a shorter budget, scored at 1 and 2 steps
    python bench/fewstep.py report
    python bench/fewstep.py all

The teacher is ``--teacher RUN``: by default the 30-minute run on the cars that
bench/conditional.py trains (``bench/out/conditional/runs/cars``, its ``CARS_RECIPE``:
``flow-cpu`` as it was before issue 14). The budget is images (the student's 300,000: about 4
hours on this project's 2-core machine with the autoguided teacher, and as long again for the
trunk's last 60,000 at a constant rate, the cool-down's control; a run made for a smaller
``--images`` goes on to the larger one when asked), so the student does not depend on the
machine; the report gives the minutes it took here, so run nothing else heavy beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import quality
from common import BENCHMARKS, ROOT, matmul_peak, write_section
from quality_setup import DEFAULT_DATA, Settings, difflab, save
from report_fewstep import FINAL, START_KEY, START_SIGMA, STUDENT_STEPS, grid

LEVEL_RHOS = [3.0, 5.0, 7.0, 10.0, 14.0]  # 2 steps' second level: 10.9, 4.4, 2.52, 1.53, 1.06
CONFIRM_SEED = 1  # the levels' held-out check: 1,000 other images than seed 0's
# (sampler, steps): 1, 2, 4, 10 and 35 network evaluations with the solvers that do best there.
TEACHER_ROWS = [("ipndm", 1), ("ipndm", 2), ("ipndm", 4), ("dpm++2m", 4), ("ipndm", 10),
                ("heun", 18)]  # fmt: skip
TEACHER_AG_ROWS = [("heun", 9)]  # autoguided: 34 evaluations, the nearest to 35
HEADING = "## One and two steps"
AG = ["method.consistency.teacher_guide='{guide}'", "method.consistency.teacher_guidance=2"]
LR4, LR10, PM0 = "train.lr=4e-4", "train.lr=1e-3", "method.consistency.p_mean=0.0"
#: Distillation settings screened against the student's own (``lever NAME``): --set overrides,
#: or flags of ``difflab distill`` ("--...").
LEVERS = {
    "base": [],
    "lr4": [LR4],
    "n10": ["method.consistency.start_levels=10", "method.consistency.max_levels=10"],
    # the teacher's ODE autoguided by its own EMA at a third of its steps (its checkpoint 980 of
    # 3,044; the quality benchmark's flow-cpu guides at a quarter), w = 2 (AG)
    "lr4-ag": [LR4, *AG],
    # a stronger teacher guidance than its best sampler's (w = 2)
    "lr4-ag3": [LR4, AG[0], "method.consistency.teacher_guidance=3"],
    "lr10-ag": [LR10, *AG],
    # more draws at high noise, where the 1-step student starts: log sigma centred on 0, not
    # -1.1, draws the 6 of 17 pairs above sigma = 10 13% of the time instead of 5%
    "lr4-ag-pm0": [LR4, *AG, PM0],
    # the trend of lr4-ag-pm0 followed one step further: centred on log sigma 0.6 (sigma 1.8),
    # the pairs above sigma = 10 are drawn 20% of the time
    "lr4-ag-pm06": [LR4, *AG, "method.consistency.p_mean=0.6"],
    # the two 1-step levers together: the rate of lr10-ag, the draws of lr4-ag-pm0
    "lr10-ag-pm0": [LR10, *AG, PM0],
    # the target network theta^- of Song et al. 2023's ImageNet-64 and LSUN distillations, an
    # EMA of the student (mu = 0.95 per step at N = 40; their CIFAR-10 code distils with mu = 0
    # at N = 18), not improved CT's mu = 0: here the run's EMA, whose half-life is 5% of the
    # images seen (mu 0.96 at 12,000 images)
    "lr4-ag-pm0-ema": [LR4, *AG, PM0, "method.consistency.target='ema'"],
    # twice the steps for the same images: batch 16 (on the H200, batch 32 in half the images
    # matched batch 128, i.e. steps counted more than images at these lengths)
    "lr4-ag-pm0-b16": [LR4, *AG, PM0, "train.batch_size=16"],
    # dropout in the student's residual blocks (the teacher trained without): improved CT finds
    # consistency models gain from more dropout than diffusion models (0.3 on CIFAR-10, Song &
    # Dhariwal 2023, sec. 3.1); ECT's one-hour CIFAR-10 tuning of EDM's model (trained at 0.13)
    # uses 0.2 (Geng et al. 2024, run_ecm_1hour.sh)
    "lr4-ag-pm0-drop2": [LR4, *AG, PM0, "network.unet.dropout=0.2"],
    # the original paper's weighting (n uniform over the 18 pairs, lambda = 1), not improved CT's
    # log-normal one with lambda = 1 / (s_{n+1} - s_n), which gives the 6 pairs above sigma = 10
    # 5% of the draws, the top one 0.2%
    "lr4-ag-uni": [LR4, *AG, "method.consistency.weighting='uniform'"],
    # no teacher: consistency training started from the teacher's weights (ECT's idea, Geng et
    # al. 2024; improved CT's curriculum, 10 levels doubling every 8,000 images), against
    # lr4-ag-pm0's distillation at the same rate and draws
    "ct-pm0": [LR4, PM0, "--no-teacher"],
}
GUIDE = "checkpoints/step-00000980"  # of the teacher run
DEFAULT_TEACHER = ROOT / "bench" / "out" / "conditional" / "runs" / "cars"  # conditional.py's
STUDENT = "lr4-ag"  # the screening's best, distilled for the full budget
#: The cooled-down branch: the student at its constant rate up to COOL_FROM images, then this
#: share of the branch's images with the rate falling linearly to min_lr (240,000 + 60,000).
COOL_FROM, COOLDOWN = 240_000, 0.2


class FewStepSettings(Settings):
    """quality.py's settings, with this benchmark's folders and bench/conditional.py's car
    reference (the 5,000 training cars)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        name = "fewstep-quick" if args.quick else "fewstep"
        self.out = ROOT / "bench" / "out" / name
        self.results = self.out / "results" if args.quick else ROOT / "bench" / "results" / name
        # absolute: difflab runs in the checkout's root, not where this was started
        self.teacher = Path(args.teacher).resolve()
        self.guide = Path(args.guide).resolve() if args.guide else self.teacher / GUIDE
        self.reference = Path(args.ref).resolve()
        self.images = 64 if args.quick else args.images

    @property
    def ref(self) -> Path:
        return self.reference


def piece_distill(settings: Settings) -> None:
    """``difflab distill`` with the STUDENT lever at a constant rate for the image budget
    (resumed if cut short), stopping at COOL_FROM on the way: the cool-down branches there."""
    for images in sorted({min(COOL_FROM, settings.images), settings.images}):
        _distill(settings, settings.run_dir("student"), STUDENT, images)


def _distill(settings: Settings, run_dir: Path, lever: str, images: int) -> None:
    if (run_dir / "config.json").exists():
        # the budget may have grown since (--images): the run goes on to it, bit-exactly
        difflab(settings, "train", "--resume", run_dir, "--images", images, "--no-progress")
        return
    guide = settings.guide  # a lever's items are --set overrides, or flags of distill ("--...")
    sets = [
        a
        for item in LEVERS[lever]
        for a in ((item,) if item.startswith("--") else ("--set", item.format(guide=guide)))
    ]
    difflab(settings, "distill", settings.teacher, "--out", run_dir, "--images", images,
            "--set", "train.sample_every_kimg=0", *sets, "--no-progress")  # fmt: skip


def piece_cooldown(settings: Settings) -> None:
    """Warm-up, stable, decay (Hägele et al. 2024) on the student: a branch of its run at
    COOL_FROM images, resumed with ``train.lr_schedule='cooldown'`` for a quarter more images
    (the trunk keeps its constant rate, to be extended). The trainer refuses a resume that would
    change a rate already used, so the branch is the run planned so from the start."""
    trunk, branch = settings.run_dir("student"), settings.run_dir("student-cool")
    if not (branch / "config.json").exists():
        _branch(trunk, branch, COOL_FROM)
    difflab(settings, "train", "--resume", branch, "--images", round(COOL_FROM / (1 - COOLDOWN)),
            "--set", "train.lr_schedule='cooldown'", "--set", f"train.cooldown={COOLDOWN}",
            "--no-progress")  # fmt: skip
    piece_student(settings, "student-cool")


def _branch(trunk: Path, branch: Path, images: int) -> None:
    """A run directory that goes on from ``trunk``'s checkpoint at ``images`` images (each
    budget the student was distilled for ends in one): what --resume reads."""
    checkpoint = _checkpoint_at(trunk, images)
    (branch / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "log.jsonl", "invocations.jsonl"):
        shutil.copy2(trunk / name, branch / name)
    shutil.copytree(checkpoint, branch / "checkpoints" / checkpoint.name)


def _checkpoint_at(run: Path, images: int) -> Path:
    """The folder of ``run``'s checkpoint after ``images`` images (it may not exist)."""
    from difflab.config import load_json

    steps = images // load_json(run / "config.json").train.batch_size
    return run / "checkpoints" / f"step-{steps:08d}"


def piece_lever(settings: Settings, name: str) -> None:
    """One of LEVERS distilled for ``--images`` and scored at 1 and 2 steps, and at 1 step from
    sigma 10 (START_SIGMA: start-screen.json's best start); a row distilled from another
    ``--teacher`` than the benchmark's names it, with this machine's matmul peak. A row
    recorded before the start was scored gets that score added."""
    from difflab.train.checkpoint import checkpoint_step

    path = settings.result("levers")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    other = settings.teacher.resolve() != DEFAULT_TEACHER.resolve()
    teacher = {"teacher": settings.teacher.name} if other else {}
    suffix = f"-{settings.teacher.name}" if other else ""
    run_dir = settings.run_dir(f"lever-{name}-{settings.images}{suffix}")
    row = next((r for r in rows if r["lever"] == name and r["images"] == settings.images
                and r.get("teacher") == teacher.get("teacher")), None)  # fmt: skip
    if row is None:
        shorter = _shorter_run(settings, name, suffix)
        if shorter and not (run_dir / "config.json").exists():  # goes on from it, bit-exactly
            _branch(shorter[1], run_dir, shorter[0])
        _distill(settings, run_dir, name, settings.images)
        scores = {str(k): _score(settings, run_dir, "--steps", k) for k in (1, 2)}
        minutes = quality._elapsed_minutes(run_dir)
        if other:
            teacher["matmul_peak_gflops"] = matmul_peak(10)
            teacher["guide"] = checkpoint_step(settings.guide)
        row = {"lever": name, "images": settings.images, "sets": LEVERS[name],
               "minutes": minutes, "scores": scores, **teacher}  # fmt: skip
        rows.append(row)
    if START_KEY not in row["scores"]:
        row["scores"][START_KEY] = _score(
            settings, run_dir, "--steps", 1, "--sigma-max", START_SIGMA
        )
    save(path, {"rows": rows})


def _shorter_run(settings: Settings, name: str, suffix: str) -> tuple[int, Path] | None:
    """The longest run of lever ``name`` (from the same teacher) distilled to fewer images than
    ``--images``, and its images: a longer screen of a lever goes on from it (a constant rate,
    so the same run as a fresh one)."""
    runs = []
    for path in (settings.out / "runs").glob(f"lever-{name}-*{suffix}"):
        images = path.name.removeprefix(f"lever-{name}-").removesuffix(suffix)
        if not (images.isdigit() and int(images) < settings.images):
            continue
        # one stopped short of its images has no checkpoint there: not a start
        if (path / "config.json").exists() and _checkpoint_at(path, int(images)).is_dir():
            runs.append((int(images), path))
    return max(runs, default=None)


def _score(settings: Settings, run: Path, *extra: object) -> dict:
    """``difflab eval`` of a run: it samples ``settings.num`` images with ``extra``'s options."""
    out = settings.out / "evals" / f"{run.name}-{time.time_ns()}.json"
    started = time.monotonic()
    difflab(settings, "eval", run, "--ref", settings.ref, "--json", out, "--num", settings.num,
            *extra)  # fmt: skip
    result = json.loads(out.read_text())
    return {"fid": result["fid"], "kid": result["kid_mean"], "kid_std": result["kid_std"],
            "evaluations": result["evaluations"], "eval_seconds": time.monotonic() - started}  # fmt: skip


def _rate(run_dir: Path, sampler: str | None, steps: int, num: int = 100, guide=None) -> float:
    """Sampling images/s of ``num`` images in-process, after a warm-up batch."""
    from difflab.api import load_run

    run = load_run(run_dir, device="cpu", guide=guide)  # a named guide: w = 2 (AUTOGUIDANCE)
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


def piece_student(settings: Settings, name: str = "student") -> None:
    from difflab import load_run, save_grid

    student = settings.run_dir(name)

    def measure(sampler, steps):
        return {**_score(settings, student, "--steps", steps),
                "images_per_s": _rate(student, None, steps)}  # fmt: skip

    _rows(settings, name, [("consistency", k) for k in STUDENT_STEPS], measure)
    if name != FINAL:  # the report shows the final student's samples and what it cost
        return
    # what the report says of the student's cost and of this machine, kept with the rates so
    # that the report can be written again anywhere, without the run folder
    config = json.loads((student / "config.json").read_text())
    save(settings.result("distill"), {"images": config["train"]["images"],
                                      "minutes": quality._elapsed_minutes(student),
                                      "matmul_peak_gflops": matmul_peak(10)})  # fmt: skip
    run = load_run(student, device="cpu")
    for k in STUDENT_STEPS:  # the same 64 seeds at each step count
        save_grid(run.sample(64, seed=0, steps=k).clamp(-1, 1), _figures(settings) / grid(k, name))


def piece_levels(settings: Settings) -> None:
    """The 2-step student with its intermediate level moved (``--rho`` of the few-step grid:
    2.52 at the default rho = 7); Song et al. 2023 chose that level by search. The default and
    the best level are then scored again on other seeds (CONFIRM_SEED): the search chose on the
    first 1,000."""
    from difflab.schedules import edm_sigma_grid

    student, path = settings.run_dir(FINAL), settings.result("levels")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []

    def score(rho: float, seed: int) -> None:
        if any(r["rho"] == rho and r.get("seed", 0) == seed for r in rows):
            return
        scores = _score(settings, student, "--steps", 2, "--rho", rho, "--seed", seed)
        level = float(edm_sigma_grid(3, 0.002, 80.0, rho)[1])
        rows.append({**scores, "rho": rho, "level": level, "seed": seed})
        save(path, {"rows": rows})

    for rho in LEVEL_RHOS:
        score(rho, 0)
    best = min((r for r in rows if r.get("seed", 0) == 0), key=lambda r: r["fid"])["rho"]
    for rho in sorted({7.0, best}):
        score(rho, CONFIRM_SEED)


def _figures(settings: Settings) -> Path:
    return settings.out if settings.quick else ROOT / "docs" / "figures"


def piece_teacher(settings: Settings) -> None:
    def measure(sampler, steps):
        return {**_score(settings, settings.teacher, "--sampler", sampler, "--steps", steps),
                "images_per_s": _rate(settings.teacher, sampler, steps)}  # fmt: skip

    _rows(settings, "teacher", TEACHER_ROWS, measure)
    guide = settings.guide

    def guided(sampler, steps):  # the teacher autoguided as the lr4-ag student's teacher is
        return {**_score(settings, settings.teacher, "--sampler", sampler, "--steps", steps,
                         "--guide", guide, "--guidance", 2),
                "images_per_s": _rate(settings.teacher, sampler, steps, guide=guide)}  # fmt: skip

    _rows(settings, "teacher-ag", TEACHER_AG_ROWS, guided)


def report_values(settings: Settings) -> dict:
    """What ``report`` writes from: the results of every piece, none of the run folders."""
    from report_fewstep import LEVELS, MODELS

    pieces = (
        [piece for piece, _ in MODELS] + [f"levels{suffix}" for suffix, _ in LEVELS] + ["levers"]
    )
    values = {piece: json.loads(settings.result(piece).read_text())["rows"]
              for piece in pieces if settings.result(piece).exists()}  # fmt: skip
    if not settings.result("distill").exists():
        raise SystemExit(
            f"no {settings.result('distill')}: run `fewstep.py cooldown` (the final student) first"
        )
    values["distill"] = json.loads(settings.result("distill").read_text())
    values["student_lever"] = STUDENT
    values["teacher"] = values.get("teacher", [])
    return values


def piece_report(settings: Settings) -> None:
    from report_fewstep import section

    text = section(report_values(settings), settings, _figures(settings))
    target = settings.out / "benchmarks.md" if settings.quick else BENCHMARKS
    print(f"wrote {write_section(HEADING, text, target)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "piece",
        choices=["distill", "student", "cooldown", "teacher", "levels", "lever", "report", "all"],
    )
    parser.add_argument("lever", nargs="?", choices=list(LEVERS), help="for the lever piece")
    parser.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER)
    parser.add_argument(
        "--guide", type=Path, help=f"the teacher's guide (default: TEACHER/{GUIDE})"
    )
    parser.add_argument("--ref", default=ROOT / "bench" / "out" / "conditional" / "ref-cars.npz")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=300_000, help="the trunk's budget")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    args = parser.parse_args()
    from difflab.train.checkpoint import list_checkpoints

    if args.guide is not None and args.guide not in list_checkpoints(args.guide.parent.parent):
        parser.error(f"--guide {args.guide}: name a checkpoint folder, RUN/checkpoints/step-N")
    args.curve_num, args.max_minutes, args.minutes, args.chunks = 0, float("inf"), 0, 1
    settings = FewStepSettings(args)
    pieces = {"distill": piece_distill, "student": piece_student, "cooldown": piece_cooldown,
              "teacher": piece_teacher, "levels": piece_levels, "report": piece_report}  # fmt: skip
    if args.piece == "lever":
        return piece_lever(settings, args.lever or "base")
    for name in list(pieces) if args.piece == "all" else [args.piece]:
        pieces[name](settings)


if __name__ == "__main__":
    main()
