"""Reliability, round four: what a fourth hostile probe found (2026-11-28), each case as a test.

A distilled student's teacher swapped on resume, a resume that trains nothing rewriting the
run's config, read-only folders found after the work, distill settings that made another model
or did nothing, and a Ctrl-C while torch loads. A run cut off before its first checkpoint is in
test_consistency.py (it resumes from its teacher's weights).
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import tempfile

import pytest
from conftest import run_cli
from reliability import assert_one_line_error


def _distill(capsys, teacher, out, *extra):
    code, _, err = run_cli(capsys, "distill", teacher, "--out", out, "--no-progress", *extra)
    assert code == 0, err


def test_a_student_resumed_with_another_teacher_or_a_teacher_trained_on_is_refused(
    teacher, tmp_path, tiny_preset, image_folder, capsys
):
    """The teacher's path may change on resume (a moved folder), its weights may not: distill
    records their fingerprint, and a resume names the mismatch in one line."""
    student = tmp_path / "student"
    _distill(capsys, teacher, student, "--steps", 2)
    other = tmp_path / "other"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", other]
    assert run_cli(capsys, *args, "--steps", 4, "--seed", 7, "--no-progress")[0] == 0
    resume = ["train", "--resume", student, "--steps", 4, "--no-progress"]
    code, _, err = run_cli(capsys, *resume, "--set", f"method.consistency.teacher='{other}'")
    assert_one_line_error(code, err, str(other), "hold other weights than this student's teacher")
    code, _, err = run_cli(capsys, "train", "--resume", teacher, "--steps", 6, "--no-progress")
    assert code == 0, err  # the teacher trained on: its newest weights are not the student's
    code, _, err = run_cli(capsys, *resume)
    assert_one_line_error(code, err, str(teacher), "distil again")


def test_a_resume_with_nothing_left_to_train_leaves_config_json_as_it_was(
    teacher, tmp_path, capsys
):
    student = tmp_path / "student"
    _distill(capsys, teacher, student, "--steps", 2)
    before = (student / "config.json").read_bytes()
    for change in (["--steps", "1"], ["--set", "method.consistency.teacher_guide=''"]):
        code, out, err = run_cli(capsys, "train", "--resume", student, *change, "--no-progress")
        assert code == 0 and "already reached its length" in out, err
        assert (student / "config.json").read_bytes() == before


def test_a_run_or_eval_folder_that_refuses_files_is_named_before_any_work(
    teacher, tmp_path, capsys, monkeypatch
):
    """A read-only run folder (a mount: the permission bits allow it) is refused before the
    data loads, and `eval RUN` is refused before sampling when its result cannot go there."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, _, err = run_cli(capsys, "train", "--resume", teacher, "--steps", 6, "--no-progress")
    assert_one_line_error(code, err, f"--resume: cannot write in {teacher}", "Read-only")
    assert "data:" not in err
    code, out, err = run_cli(capsys, "eval", teacher, "--ref", tmp_path / "r.npz", "--num", 4)
    assert_one_line_error(code, err, f"cannot write in {teacher}", "give --json FILE")
    assert "FID" not in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "method.name='flow'"], "distill makes a consistency model"),
        (["--set", "method.consistency.base='flow'"], "drop --set method.consistency.base"),
        (["--guidance", "1", "--guide", "{teacher}/checkpoints/step-00000003"], "drop --guide"),
        (["--guide", "{teacher}"], "holds the teacher's own weights"),
        (["--set", "method.consistency.start_levels=50"], "must not exceed max_levels (18)"),
    ],
)
def test_distill_settings_that_make_another_model_or_do_nothing_are_refused(
    teacher, tmp_path, capsys, extra, message
):
    """Each once went through: a flow run from distill, a student on a base its weights do not
    fit, a named guide switched off by w = 1, the teacher as its own guide, a curriculum start
    clamped to its end."""
    extra = [item.format(teacher=teacher) for item in extra]
    code, _, err = run_cli(capsys, "distill", teacher, "--out", tmp_path / "s", "--steps", 1,
                           *extra)  # fmt: skip
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "s").exists()


def test_the_command_line_imports_torch_inside_its_error_handling():
    """`import difflab.cli` (what the `difflab` script runs first) loads no torch: a Ctrl-C in
    the seconds torch takes to load is "difflab: interrupted", not a traceback."""
    code = "import sys, difflab.cli, difflab; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    code = "import difflab; print(difflab.load_run.__module__, difflab.DifflabError.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["difflab.api", "DifflabError"], done.stderr


def test_the_api_names_a_wrong_sampler_option_in_one_line(teacher):
    """Options of the wrong type, sampler options given to sample(), and a plan with its own
    sampler and steps given beside it were Python TypeErrors or silently ignored."""
    import difflab

    run = difflab.load_run(teacher, device="cpu")
    calls = [
        (lambda: run.plan("heun", 2, rho="10"), "sampler.rho: expected a number, got '10'"),
        (lambda: run.plan(steps=2, clip_x0=1), "sampler.clip_x0: expected true or false, got 1"),
        (lambda: run.sample(2, rho=10), "unknown option rho; sampler options go in plan="),
        (lambda: run.generate(2, plan=run.plan(), steps=4), "give plan= or sampler="),
    ]
    for call, message in calls:
        with pytest.raises(difflab.DifflabError, match=re.escape(message)):
            call()
    assert run.sample(2, plan=run.plan("heun", 2, rho=10)).shape[0] == 2  # an int for a float


def test_eta_is_refused_by_a_sampler_that_has_none(teacher, tmp_path, capsys):
    """`sample --eta 1` with heun (or a consistency model's sampler) was accepted and unused."""
    code, _, err = run_cli(capsys, "sample", teacher, "--sampler", "heun", "--eta", "1",
                           "--num", 2, "--out", tmp_path / "s")  # fmt: skip
    assert_one_line_error(code, err, "eta is DDIM's; sampler 'heun' has none: drop --eta")
    assert not (tmp_path / "s").exists()


def test_export_takes_sample_s_spelling_of_the_raw_weights(teacher, tmp_path, capsys):
    """`sample --no-ema` and `export --raw` are one choice: export takes both spellings."""
    from safetensors.torch import load_file

    from difflab.train.checkpoint import list_checkpoints

    code, _, err = run_cli(
        capsys, "export", teacher, "--no-ema", "--out", tmp_path / "raw.safetensors"
    )
    assert code == 0, err
    exported = load_file(str(tmp_path / "raw.safetensors"))
    newest = list_checkpoints(teacher)[-1]
    raw, ema = (load_file(str(newest / name)) for name in ("net.safetensors", "ema.safetensors"))
    assert all(exported[k].equal(v) for k, v in raw.items())
    assert not all(ema[k].equal(v) for k, v in raw.items())  # the EMA would have failed this
