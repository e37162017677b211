"""Reliability, round three: what a third hostile probe found (2026-11-27), each case as a test.

The Python API bounded as the command line is, failed writes as advice, a distilled student
that outlives its teacher's folder, checkpoints of another model refused, and files cut off by
a crash read as far as they go. Out of memory on the CPU is in test_reliability.py; the
conditional diffusers export's model card in test_diffusers_export.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest
import torch
from conftest import run_cli
from reliability import assert_one_line_error
from safetensors.torch import load_file

import difflab
from difflab import io as difflab_io
from difflab.config import load_json
from difflab.errors import DifflabError
from difflab.io import atomic_write_text
from difflab.train.checkpoint import list_checkpoints


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda run: run.plan("euler", 10**9), "steps must be an integer in [1, 10000]"),
        (lambda run: run.sample(2, sampler="euler", steps=0), "steps must be an integer in [1"),
        (lambda run: run.sample(0), "num must be an integer in [1, 100000], got 0"),
        (lambda run: run.sample(-1), "num must be"),
        (lambda run: run.sample(2.0), "num must be an integer"),
        (lambda run: run.sample(2, batch_size=0), "batch_size must be an integer in [1, 1024]"),
        (lambda run: run.sample(2, seed=-1), "seed must be"),
        (lambda run: run.plan("euler", 2, grid="bogus"), "sampler.grid must be one of"),
        (lambda run: run.plan("euler", 2, rho=0.001), "sampler.rho must be a number in [1,"),
        (
            lambda run: run.plan("euler", 2, bogus=1),
            "unknown plan option 'bogus'; known options: clip_x0, eta,",
        ),
    ],
)
def test_the_python_api_is_bounded_as_the_command_line_is(teacher, call, message):
    run = difflab.load_run(teacher, device="cpu")
    with pytest.raises(DifflabError) as error:
        call(run)
    assert message in str(error.value)


def test_the_api_checks_a_torch_device_as_it_checks_its_name(teacher):
    with pytest.raises(DifflabError, match="unknown device 'meta'"):
        difflab.load_run(teacher, device=torch.device("meta"))
    if not torch.cuda.is_available():
        with pytest.raises(DifflabError, match="no CUDA GPU is available"):
            difflab.load_run(teacher, device=torch.device("cuda"))
    assert difflab.load_run(teacher, device=torch.device("cpu")).sample(2, steps=2).shape[0] == 2


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EFBIG, "File too large"), OSError(errno.ENOSPC, "No space left on device")],
)
def test_a_failed_write_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    def fail(*args):
        raise error

    monkeypatch.setattr(difflab_io.os, "replace", fail)
    with pytest.raises(DifflabError) as raised:
        atomic_write_text(tmp_path / "page.html", "x" * 100)
    expected = "disk full" if error.errno == errno.ENOSPC else "could not write"
    assert expected in str(raised.value) and str(tmp_path / "page.html") in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_refuses_files_is_named_before_any_work(
    teacher, tmp_path, capsys, monkeypatch
):
    # /sys and read-only mounts pass os.access and then refuse every new file
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, _, err = run_cli(capsys, "ref", teacher, "--out", tmp_path / "ref.npz")
    assert_one_line_error(code, err, f"--out: cannot write in {tmp_path}", "Permission denied")


def test_a_student_whose_teacher_moved_resumes_with_the_new_path(
    teacher, tmp_path, capsys, monkeypatch
):
    student = tmp_path / "student"
    code, _, err = run_cli(capsys, "distill", teacher, "--out", student, "--steps", 2,
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    moved = shutil.move(teacher, tmp_path / "moved")
    resume = ["train", "--resume", student, "--steps", 4, "--no-progress"]
    code, _, err = run_cli(capsys, *resume)
    assert_one_line_error(code, err, str(teacher), "--set method.consistency.teacher=")
    monkeypatch.chdir(tmp_path)  # a relative new path is stored absolute
    code, _, err = run_cli(capsys, *resume, "--set", "method.consistency.teacher='moved'")
    assert code == 0, err
    assert f'"teacher": "{moved}"' in (student / "config.json").read_text()


def test_a_checkpoint_of_another_model_is_refused_and_a_bare_name_is_the_runs(
    teacher, tmp_path, capsys
):
    student = tmp_path / "student"
    code, _, err = run_cli(capsys, "distill", teacher, "--out", student, "--steps", 2,
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    theirs = list_checkpoints(student)[-1]
    code, _, err = run_cli(capsys, "sample", teacher, "--checkpoint", theirs, "--num", 2,
                           "--out", tmp_path / "s")  # fmt: skip
    assert_one_line_error(code, err, "is a checkpoint of another model (consistency")
    ours = list_checkpoints(teacher)[0]
    run = difflab.load_run(teacher, checkpoint=ours.name, device="cpu")
    weights = load_file(str(ours / "ema.safetensors"))
    assert run.step == 3
    assert all(torch.equal(v, weights[k]) for k, v in run.net.state_dict().items())


def test_a_distilled_network_or_size_other_than_the_teachers_is_refused(teacher, tmp_path, capsys):
    distill = ["distill", teacher, "--out", tmp_path / "student", "--steps", 1, "--no-progress"]
    code, _, err = run_cli(capsys, *distill, "--set", "network.unet.channels=16")
    assert_one_line_error(code, err, "cannot change", "--from-scratch")
    code, _, err = run_cli(capsys, *distill, "--set", "data.image_size=16", "--from-scratch")
    assert_one_line_error(code, err, "makes 8x8 images")
    assert not (tmp_path / "student").exists()
    code, _, err = run_cli(capsys, *distill, "--set", "network.unet.channels=16", "--from-scratch")
    assert code == 0, err  # a student network of its own, distilled from the teacher
    # dropout makes no weight: a student of the teacher's weights may add it (improved CT, ECT)
    dropout = tmp_path / "dropout"
    code, _, err = run_cli(capsys, "distill", teacher, "--out", dropout, "--steps", 1,
                           "--set", "network.unet.dropout=0.2", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert load_json(dropout / "config.json").network.unet.dropout == 0.2


def test_report_reads_logs_cut_off_or_garbled_by_a_crash(teacher, tmp_path, capsys):
    with open(teacher / "invocations.jsonl", "a") as handle:
        handle.write('{"started": "2026-11-27", "mach')  # cut off mid-line
    with open(teacher / "log.jsonl", "ab") as handle:
        handle.write(b'{"step": 9, "loss": \xff\xfe}\n[1, 2]\n')
    code, _, err = run_cli(capsys, "report", teacher, "--out", tmp_path / "report.html")
    assert code == 0, err
    assert "step 4" in (tmp_path / "report.html").read_text()


def test_a_data_folder_named_in_bytes_that_are_not_utf8_trains(tmp_path, tiny_preset, capsys):
    from conftest import make_images

    try:
        folder = make_images(tmp_path / os.fsdecode(b"bad\xffname"), 12)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    code, _, err = run_cli(capsys, "train", "--preset", tiny_preset, "--data", folder,
                           "--out", tmp_path / "run", "--steps", 1, "--no-progress")  # fmt: skip
    assert code == 0, err


def test_eval_hints_name_what_eval_takes(teacher, tmp_path, capsys):
    (tmp_path / "stats.txt").write_text("not statistics")
    code, _, err = run_cli(capsys, "eval", teacher, "--ref", tmp_path / "stats.txt")
    line = assert_one_line_error(code, err, "neither a .npz of reference statistics")
    assert "--data" not in line
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "ref", tmp_path / "empty", "--out", tmp_path / "ref.npz")
    assert "--data" not in assert_one_line_error(code, err, "give a folder of images")
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "stats.txt", "--steps", 2)
    assert_one_line_error(code, err, "is a file, not a run directory")
