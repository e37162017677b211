"""Every section of docs/benchmarks.md is what its bench/ script writes from bench/results alone.

Each test renders one section from the committed results, here, without the run folders
(bench/out) or the machine that measured them, and requires docs/benchmarks.md unchanged: a
report that reads a run folder or measures at report time, a code change not rendered into the
doc, or a hand edit of the section fails its test. Nothing is trained or scored; plots go to
tmp_path, never over docs/figures.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
RESULTS = BENCH / "results"


def assert_committed(heading: str, text: str) -> None:
    """``text`` is the ``heading`` section of docs/benchmarks.md as committed, to the byte."""
    from common import BENCHMARKS, replace_section

    committed = BENCHMARKS.read_text()
    assert not re.search(r"\{\w+\[", text)  # no f-string field left unformatted
    lines = committed.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), None)
    shown = "\n".join(lines[start:end]).rstrip("\n")
    assert text.rstrip("\n").splitlines() == shown.splitlines()  # a readable difference first
    assert replace_section(committed, heading, text.rstrip("\n") + "\n") == committed


def test_the_speed_section_is_what_the_report_writes_from_the_committed_results(
    monkeypatch, tmp_path
):
    """`bench/throughput.py --render --out COPY` rewrites "## Speed" of a copy of the doc from
    bench/results/throughput.json alone: the copy is left as committed."""
    monkeypatch.syspath_prepend(str(BENCH))
    import throughput
    from common import BENCHMARKS

    copy = tmp_path / "benchmarks.md"
    shutil.copyfile(BENCHMARKS, copy)
    assert throughput.main(["throughput.py", "--render", "--out", str(copy)]) == 0
    assert copy.read_text().splitlines() == BENCHMARKS.read_text().splitlines()
    assert copy.read_text() == BENCHMARKS.read_text()


def test_the_gpu_section_is_what_the_report_writes_from_the_committed_results(monkeypatch):
    """`bench/gpu.py --render` of the six H100 runs and the two H200 runs with the CPU's score of
    their samples (bench/README.md's command) writes "## GPU" as committed."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu
    import report_gpu

    written = []
    monkeypatch.setattr(gpu, "write_report", lambda cards: written.append(cards) or "doc")
    runs = [str(RESULTS / "gpu" / f"h100-{n}.json") for n in range(1, 7)]
    runs += [str(RESULTS / "gpu" / f"h200-{n}.json") for n in (1, 2)]
    scored = str(RESULTS / "gpu" / "h100-samples-eval.json")
    assert gpu.main(["gpu.py", "--render", *runs, "--scored", scored]) == 0
    assert_committed(report_gpu.HEADING, report_gpu.section(*written[0]))


def test_the_quality_section_is_what_the_report_writes_from_the_committed_results(
    monkeypatch, tmp_path
):
    """bench/quality.py report's "## Quality" from bench/results/quality; its plots go to
    tmp_path, where the committed sample pictures it shows are found by name."""
    monkeypatch.syspath_prepend(str(BENCH))
    import quality
    import report_quality

    for picture in report_quality.FIGURES.glob("bench-*.png"):
        (tmp_path / picture.name).write_bytes(b"")
    args = argparse.Namespace(
        quick=False, data="unused", minutes=30.0, chunks=3, num=1000, curve_num=1000,
        max_minutes=float("inf"),
    )  # fmt: skip
    settings = quality.Settings(args)
    expected = [*quality.ENTRIES, "lucidrains"]  # as quality.piece_report
    text = report_quality.section(settings, quality.load_results, expected, tmp_path)
    assert_committed(report_quality.HEADER, text)
    assert {p.name for p in tmp_path.glob("*.png") if p.stat().st_size} == {
        "samplers-flow.png", "fid-vs-time.png"
    }  # fmt: skip


def test_the_classes_section_is_what_the_report_writes_from_the_committed_results(
    monkeypatch, tmp_path
):
    """bench/conditional.py report's "## Classes" from bench/results/conditional: the runs'
    training minutes come from the results, not from bench/out's run folders."""
    monkeypatch.syspath_prepend(str(BENCH))
    import conditional
    import quality
    from report_conditional import FIGURE, section

    def no_run_folder(run_dir):
        raise AssertionError(f"the report read the run folder {run_dir}")

    monkeypatch.setattr(quality, "_elapsed_minutes", no_run_folder)
    args = argparse.Namespace(
        quick=False, data="unused", minutes=30.0, chunks=3, num=1000, curve_num=0,
        max_minutes=float("inf"),
    )  # fmt: skip
    (tmp_path / FIGURE).write_bytes(b"")  # the class grid the measuring machine copied
    text = section(conditional.report_values(conditional.settings_for(args)), tmp_path)
    assert_committed(conditional.HEADING, text)


def test_the_few_step_section_is_what_the_report_writes_from_the_committed_results(
    monkeypatch, tmp_path
):
    """docs/benchmarks.md's "## One and two steps" is bench/fewstep.py's report of
    bench/results/fewstep, written again here without any run folder: a report that reads a run
    (or a hand edit of the section) fails this."""
    monkeypatch.syspath_prepend(str(BENCH))
    import fewstep
    from report_fewstep import FINAL, STUDENT_STEPS, grid, section

    args = fewstep.argparse.Namespace(
        quick=False, teacher=fewstep.DEFAULT_TEACHER, guide=None, ref="unused", data="unused",
        images=300_000, num=1000, curve_num=0, max_minutes=float("inf"), minutes=0, chunks=1,
    )  # fmt: skip
    settings = fewstep.FewStepSettings(args)
    for k in STUDENT_STEPS:  # the section shows the pictures that exist; the plot goes here
        (tmp_path / grid(k, FINAL)).write_bytes(b"")
    text = section(fewstep.report_values(settings), settings, tmp_path)
    assert "300,000 images" in text
    assert_committed(fewstep.HEADING, text)


def test_the_ablation_section_is_what_the_report_writes_from_the_committed_results(monkeypatch):
    """bench/ablation.py report's "## Ablation" from bench/results/ablation (and the quality
    benchmark's `flow` entry, the base at 30 minutes)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import report_ablation

    assert_committed(report_ablation.HEADER, report_ablation.body())


def test_the_gpu_few_step_section_is_what_the_report_writes_from_the_committed_results(
    monkeypatch,
):
    """`bench/fewstep_gpu.py report` writes "## One and two steps on a GPU" from
    bench/results/fewstep/gpu.json (the H200's samples, scored here) as committed."""
    monkeypatch.syspath_prepend(str(BENCH))
    import fewstep_gpu

    assert_committed(fewstep_gpu.HEADING, fewstep_gpu.report(fewstep_gpu.runs()))
