"""Issue 16 on one GPU: the few-step benchmark's teacher, students distilled from it side by
side for minutes instead of hours, all sampled in one command; scored on the CPU afterwards.

    python bench/fewstep_gpu.py run DIR --data CARS [--minutes 9]   # on the GPU
        [--teacher T.safetensors]   # the teacher trained on a CPU: its 2 GPU minutes go to students
    python bench/fewstep_gpu.py score DIR [--ref REF.npz]           # here, on the CPU
    python bench/fewstep_gpu.py report                              # docs/benchmarks.md

``run`` trains the teacher with the recipe of bench/fewstep.py's (``flow-cpu`` as it was before
issue 14, on the 5,000 cars of CARS/automobile, the 3,044 steps the CPU benchmark's 30 minutes
reached, at a constant rate, its own autoguide the EMA at step 980; see TEACHER), samples it
with Heun (18 steps, 35 evaluations; autoguided at w = 2 in 9 steps, 34), then distils the
STUDENTS chosen (``--students``, all by default) at once (the runs share the GPU: on an H200
each of two side by side took about 11 steps a second, each of four 5.5 at batch 128) in two
halves of the time left (a constant rate, then as many steps again whose last fifth cools the
rate down to 0, as the CPU student's), and samples each student at 1 step after the first half,
and after the second at 1 step (from sigma 80 and from 10) and at 2 steps. The sets of 1,000
PNGs are folders in a few tar files under 15 MiB each in DIR (what a device machine returns),
named in DIR/fewstep-gpu.json; the Inception network never runs on the GPU machine. ``score``
runs ``difflab eval`` on each folder against the cars' reference and records
bench/results/fewstep/gpu.json; ``report`` writes its section.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import gpu_checks as checks
import torch
from common import BENCHMARKS, ROOT, machine_info, write_section
from conditional import CARS_RECIPE
from fewstep import COOLDOWN  # the CPU student's: the last fifth of its steps
from report_fewstep import TARGETS

import difflab
from difflab.limits import MAX_STEPS
from difflab.train.checkpoint import checkpoint_step, list_checkpoints

# The recipe of the benchmark's teacher, bench/conditional.py's cars run (flow-cpu as it was
# before issue 14: 64 channels, batch 32, constant rate): 30 minutes of a run planned for 10^9
# steps reached 3,044 steps, its guide the EMA at 980. The same recipe with today's flow-cpu
# network and batch (32 channels, batch 16) scored FID-1k 64.3 autoguided, this one 44.2 on the
# CPU against the benchmark's 43.2 (start-screen.json).
TEACHER = [*CARS_RECIPE, "--steps", "3044"]
TEACHER_SETS = ["sampler.guide_at=0.322", "train.sample_every_kimg=0"]
TEACHER_ROWS = [("heun 18", "heun", 18, 1.0), ("heun 9, autoguided", "heun", 9, 2.0)]
#: name: (batch, --set overrides); each distils from the teacher autoguided at w = 2 (lr4-ag)
STUDENTS = {
    "batch 128, lr 4e-4": (128, ["train.lr=4e-4"]),
    # more pairs drawn at high noise: -27% 1-step FID-1k at 12,000 images on the CPU (lr4-ag-pm0),
    # -12% at 160,000 on the H200 (batch 128)
    "batch 128, lr 4e-4, p_mean 0": (128, ["train.lr=4e-4", "method.consistency.p_mean=0.0"]),
    # the CPU student's batch and rate with those draws: at 75,000 images on the H200 batch 32
    # matched batch 128 at 160,000 (82.2 against 83.5 at 1 step, without them)
    "batch 32, lr 4e-4, p_mean 0": (32, ["train.lr=4e-4", "method.consistency.p_mean=0.0"]),
    # the larger batch's larger rate, with those draws (at the CPU's batch 32 it added nothing)
    "batch 128, lr 1e-3, p_mean 0": (128, ["train.lr=1e-3", "method.consistency.p_mean=0.0"]),
    # the H200's best at four times the batch: side by side with one other student, batch 32
    # and 128 ran the same steps per second (1,715 and 1,680 in 154 s), so a step's time is not
    # its images' and a larger batch sees more of them in the same minutes
    "batch 512, lr 1e-3, p_mean 0": (512, ["train.lr=1e-3", "method.consistency.p_mean=0.0"]),
    # ... with ECT's dropout: no effect at 375 steps on the CPU (lr4-ag-pm0-drop2), untried at
    # the lengths improved CT and ECT use it over
    "batch 512, lr 1e-3, p_mean 0, dropout 0.2": (
        512,
        ["train.lr=1e-3", "method.consistency.p_mean=0.0", "network.unet.dropout=0.2"],
    ),
}
STUDENT_ROWS = [("1 step", 1, 0.0), ("1 step from sigma 10", 1, 10.0), ("2 steps", 2, 0.0)]
RESULTS = ROOT / "bench" / "results" / "fewstep" / "gpu.json"
HEADING = "## One and two steps on a GPU"


def difflab_run(*args: object, device: str) -> subprocess.Popen:
    command = checks.difflab_command(*args, "--device", device, "--no-progress")
    return subprocess.Popen(command, env=checks.ENV, stderr=subprocess.PIPE, text=True)


def wait(processes: dict[str, subprocess.Popen]) -> dict[str, str]:
    """The processes' failures by name: the end of each one's error output."""
    failed = {}
    for name, process in processes.items():
        _, err = process.communicate()
        if process.returncode:
            failed[name] = f"exited {process.returncode}: {err[-600:]}"
    return failed


def student_dir(work: Path, name: str) -> Path:
    return work / name.replace(", ", "-").replace(" ", "")


def piece_run(args: argparse.Namespace) -> None:
    end = time.monotonic() + args.minutes * 60
    work, out = Path(tempfile.mkdtemp(prefix="difflab-fewstep-")), args.out
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none (CPU)"
    values: dict = {"machine": {**machine_info(sys.argv), "card": card}, "samples": []}
    num = 16 if args.quick else args.num

    def sample(model: str, label: str, run: difflab.Run, plan, **request) -> None:
        folder = f"{len(values['samples']):02d}"
        row = checks.sample_to_folder(run, plan, work / "samples" / folder, num, **request)
        seen = run.step * run.config.train.batch_size
        values["samples"].append({"model": model, "row": label, "step": run.step,
                                  "images_seen": seen, "folder": folder, **row})  # fmt: skip

    teacher, values["teacher"] = train_teacher(args, work)
    run = difflab.load_run(teacher, device=args.device)
    for label, sampler, steps, w in TEACHER_ROWS:
        sample("teacher", label, run, run.plan(sampler, steps), guidance=w)

    reserve = 30 if args.quick else 100  # seconds kept for sampling the students
    minutes = max((end - reserve - time.monotonic()) / 120, 0.2)  # each half
    values["failed"] = distill(args, teacher, work, minutes)
    values["students"] = {}
    for name in args.students:
        if name in values["failed"]:
            continue
        batch, overrides = STUDENTS[name]
        folder = student_dir(work, name)
        values["students"][name] = {"batch": batch, "sets": overrides, "minutes": 2 * minutes}
        *halfway, last = list_checkpoints(folder)
        for checkpoint in [*halfway, last]:  # the halfway checkpoint at 1 step only
            run = difflab.load_run(folder, checkpoint=checkpoint, device=args.device)
            for label, steps, sigma_max in STUDENT_ROWS[: 1 if checkpoint in halfway else None]:
                sample(name, label, run, run.plan(None, steps, sigma_max=sigma_max))
    bundle(work / "samples", values["samples"], out)
    (out / "fewstep-gpu.json").write_text(json.dumps(values, indent=2))
    print(f"{len(values['samples'])} sample sets in {out}; {end - time.monotonic():.0f} s left")


def train_teacher(args: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    """The teacher (TEACHER's recipe) and what it was: trained here, or ``--teacher``, the same
    recipe trained elsewhere (a run or its export, carried to the GPU: its minutes go to the
    students instead)."""
    if args.teacher:
        return args.teacher, {"carried": str(args.teacher), "flags": TEACHER, "sets": TEACHER_SETS}
    started, teacher = time.monotonic(), work / "teacher"
    sets = [a for s in TEACHER_SETS for a in ("--set", s)]
    quick = ["--steps", "24"] if args.quick else []
    train = ("train", *TEACHER, *quick, "--data", args.data, "--out", teacher, *sets)
    if failed := wait({"teacher": difflab_run(*train, device=args.device)}):
        raise SystemExit(f"the teacher {failed['teacher']}")
    seconds = time.monotonic() - started
    return teacher, {"seconds": seconds, "flags": TEACHER, "sets": TEACHER_SETS}


def distill(args: argparse.Namespace, teacher: Path, work: Path, minutes: float) -> dict:
    """The students chosen (``args.students``) distilled at once at a constant rate for
    ``minutes``, then resumed for as many steps again, cooled down over the last COOLDOWN of
    them, within as many minutes (a checkpoint at each end); the failures by name (a failed
    student is left out, the others go on)."""
    failed: dict[str, str] = {}
    for half in range(2):
        processes = {}
        for name in args.students:
            if name in failed:
                continue
            batch, overrides = STUDENTS[name]
            folder = student_dir(work, name)
            if half == 0:
                # no rolling checkpoints: a run's two are the ends of its halves (sampled)
                fixed = ["train.sample_every_kimg=0", f"train.checkpoint_every={MAX_STEPS}"]
                sets = [a for s in [*fixed, *overrides] for a in ("--set", s)]
                command = ("distill", teacher, "--out", folder, "--batch-size", batch, *sets,
                           "--guidance", 2)  # fmt: skip
                budget = ("--images", 10**9, "--time-limit", minutes)  # the time ends it
            else:  # as many steps again, the last COOLDOWN of them cooling down (the time limit
                # still ends it: the rates of the first half's steps do not change)
                steps = 2 * checkpoint_step(list_checkpoints(folder)[-1])
                command = ("train", "--resume", folder, "--set", "train.lr_schedule='cooldown'",
                           "--set", f"train.cooldown={COOLDOWN}")  # fmt: skip
                budget = ("--steps", steps, "--time-limit", minutes)
            processes[name] = difflab_run(*command, *budget, device=args.device)
        failed.update(wait(processes))
    return failed


def bundle(samples: Path, rows: list[dict], out: Path, limit: float = 15 * 2**20) -> None:
    """The sample folders packed into as few tar files as keep each under ``limit`` bytes
    (what comes back from a device machine: 8 files of 16 MiB at most, 64 MiB together).

    A ustar archive's size is known beforehand: a 512-byte header per member, its bytes padded
    to 512, two zero blocks and at most 10 KiB of padding at the end. (The default pax format
    adds a header to each file whose modification time has a fraction: a third more for 3 KB
    PNGs, which once made four tars too large to come back.)"""
    parts: list[list[dict]] = []
    size = float(tarfile.RECORDSIZE + 1024)
    for row in rows:
        files = list((samples / row["folder"]).iterdir())
        folder_size = 512 * (1 + sum(1 + -(-f.stat().st_size // 512) for f in files))
        if not parts or size + folder_size > limit:
            parts.append([])
            size = float(tarfile.RECORDSIZE + 1024)
        parts[-1].append(row)
        size += folder_size
    for number, part in enumerate(parts, 1):
        with tarfile.open(out / f"samples-{number}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in part:
                tar.add(samples / row["folder"], arcname=row["folder"])
                row["tar"] = f"samples-{number}.tar"
    total = sum((out / f"samples-{n}.tar").stat().st_size for n in range(1, len(parts) + 1))
    if len(parts) > 7 or total > 60 * 2**20:  # the JSON and a log beside them
        print(f"warning: {len(parts)} tar files of {total / 2**20:.0f} MiB in all: a device "
              "machine returns 8 files and 64 MiB at most; sample fewer sets or images")  # fmt: skip


def piece_score(args: argparse.Namespace) -> None:
    """``difflab eval`` of every tar named in DIR/fewstep-gpu.json against the cars' reference."""
    values = json.loads((args.out / "fewstep-gpu.json").read_text())
    for sample in values["samples"]:
        if "fid" in sample:
            continue
        with tempfile.TemporaryDirectory() as folder:
            with tarfile.open(args.out / sample["tar"]) as tar:
                members = [m for m in tar if m.name.split("/")[0] == sample["folder"]]
                tar.extractall(folder, members, filter="data")
            result = Path(folder) / "eval.json"
            command = checks.difflab_command(
                "eval", Path(folder) / sample["folder"], "--ref", args.ref, "--json", result
            )
            checks.run_command(command, timeout=3600)
            scored = json.loads(result.read_text())
        sample.update(fid=scored["fid"], kid=scored["kid_mean"], kid_std=scored["kid_std"])
        print(json.dumps({k: sample[k] for k in ("model", "row", "step", "fid", "kid")}))
        path = args.out / "fewstep-gpu.json" if args.quick else args.results
        path.write_text(json.dumps(values, indent=2) + "\n")


def runs() -> list[dict]:
    """Every scored GPU run, oldest first: RESULTS, then gpu-2.json, gpu-3.json, ... beside it."""
    later = sorted((int(m[1]), path) for path in RESULTS.parent.glob("gpu-*.json")
                   if (m := re.fullmatch(r"gpu-(\d+)", path.stem)))  # fmt: skip
    return [json.loads(path.read_text()) for path in [RESULTS, *(path for _, path in later)]]


def report(values: list[dict]) -> str:
    """The section: the first run, then each later one under its own heading."""
    return "\n".join(
        section(v, HEADING if n == 1 else f"### Run {n}: {v['machine']['card']}")
        for n, v in enumerate(values, 1)
    )


def section(values: dict, heading: str = HEADING) -> str:
    m = values["machine"]
    lines = [
        heading,
        "",
        f"_Written by `bench/fewstep_gpu.py` from samples made on **{m['card']}** (torch "
        f"{m['torch']}, {m['date']}, `{m['command']}`) and scored here with `difflab eval` "
        f"({values['samples'][0]['images']:,} images each against the 5,000 training cars)._",
        "",
        f"The teacher: `difflab train {' '.join(values['teacher']['flags'])} "
        f"{' '.join('--set ' + item for item in values['teacher']['sets'])}` (the later --set "
        f"wins; {_teacher_made(values['teacher'])}). "
        f"{_students_ran(len(values['students']))} for the same minutes in two halves: a "
        "constant rate (the rows at the first "
        f"half's step), then as many steps again, the last {COOLDOWN:.0%} cooling the rate "
        "down to 0 (the CPU student's schedule).",
        "",
        "| model | sampling | step | images seen | evaluations | FID-1k | KID |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    scored = [s for s in values["samples"] if "fid" in s]
    for s in scored:
        lines.append(
            f"| {s['model']} | {s['row']} | {s['step']:,} | {s['images_seen']:,} | "
            f"{s['evaluations']} | {s['fid']:.1f} | {s['kid']:.4f} |"
        )
    lines.append("")
    teacher = [s for s in scored if s["model"] == "teacher"]
    if not teacher:
        return "\n".join(lines)
    best = min(teacher, key=lambda s: s["fid"])
    for evaluations, margin in TARGETS.items():
        rows = [s for s in scored if s["model"] != "teacher" and s["evaluations"] == evaluations]
        if rows:
            top = min(rows, key=lambda s: s["fid"])
            ratio = top["fid"] / best["fid"] - 1
            met = "met" if ratio <= margin else "**not met**"
            lines.append(
                f"- {evaluations} evaluation(s): best {top['fid']:.1f} ({top['model']}, "
                f"{top['row']}, step {top['step']:,}) against the teacher's {best['fid']:.1f} "
                f"({best['row']}): {ratio:+.1%}, target at most {margin:+.0%}: {met}."
            )
    first = None  # the first student's final scores, which the others are compared with
    others = len(values["students"]) - 1
    beside = f" with the {'other' if others == 1 else 'others'} beside it" if others else ""
    for name, student in values["students"].items():
        seen = max((s["images_seen"] for s in scored if s["model"] == name), default=0)
        final = {
            s["row"]: s["fid"] for s in scored if s["model"] == name and s["images_seen"] == seen
        }
        versus = [
            f"{row} {fid:.1f} ({fid / first[1][row] - 1:+.0%})"
            for row, fid in final.items()
            if first and row in first[1]
        ]
        lines.append(
            f"- {name}: {seen:,} images in {student['minutes']:.1f} minutes "
            f"({seen / student['minutes'] / 60:,.0f} img/s{beside})"
            + (f"; against {first[0]}: {', '.join(versus)}." if versus else ".")
        )
        first = first or (name, final)
    lines += [f"- {name}: **failed** ({why[:200]})" for name, why in values["failed"].items()]
    return "\n".join([*lines, ""])


def _students_ran(count: int) -> str:
    who = "student" if count == 1 else "students"
    where = "alone on the GPU" if count == 1 else "side by side on the one GPU"
    return f"The {who}: `difflab distill` from it, autoguided at w = 2, run {where}"


def _teacher_made(teacher: dict) -> str:
    if "carried" in teacher:
        return f"trained on a CPU, carried to the GPU as `{teacher['carried']}`"
    return f"{teacher['seconds']:.0f} s on the GPU"


def students(names: str) -> list[str]:
    """``--students``: names of STUDENTS split by ';' (fewer side by side: more images each)."""
    chosen = [name.strip() for name in names.split(";") if name.strip()]
    unknown = [name for name in chosen if name not in STUDENTS]
    if unknown or not chosen:
        wrong = unknown[0] if unknown else names
        raise argparse.ArgumentTypeError(f"no student {wrong!r}: choose from {'; '.join(STUDENTS)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=["run", "score", "report"])
    parser.add_argument("out", type=Path, nargs="?", help="the folder of the tars and their JSON")
    parser.add_argument("--data", type=Path, help="a folder with automobile/ (the 5,000 cars)")
    parser.add_argument("--minutes", type=float, default=9.0, help="deadline of run")
    parser.add_argument(
        "--teacher", type=Path, help="TEACHER's recipe trained elsewhere (a run or an export)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--ref", type=Path, default=ROOT / "runs" / "cars-ref.npz")
    parser.add_argument("--quick", action="store_true", help="a CPU smoke test: tiny budgets")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="score's file (a later run: gpu-2.json)"
    )
    parser.add_argument(
        "--students", type=students, default=list(STUDENTS), help="run's STUDENTS, names split by ;"
    )
    args = parser.parse_args()
    if args.piece == "run":
        piece_run(args)
    elif args.piece == "score":
        piece_score(args)
    else:
        print(f"wrote {write_section(HEADING, report(runs()), BENCHMARKS)}")


if __name__ == "__main__":
    main()
