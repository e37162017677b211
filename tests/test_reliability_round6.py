"""Reliability, round six (2026-11-29): what a documentation audit and the sixth hostile probe
found, each case as a test."""

from __future__ import annotations

from conftest import run_cli
from reliability import assert_one_line_error


def test_a_checkpoint_folder_where_a_run_is_wanted_names_the_run_and_its_checkpoints(
    teacher, tmp_path, capsys
):
    """A missing guide checkpoint said "run directory ... does not exist"; a checkpoint folder
    given to sample said "config.json not found: is this a difflab run directory?"."""
    kept = teacher / "checkpoints" / "step-00000004"
    out = tmp_path / "samples"
    missing = teacher / "checkpoints" / "step-00002000"
    code, _, err = run_cli(capsys, "sample", teacher, "--guide", missing, "--out", out)
    assert_one_line_error(code, err, "keeps: step-00000003, step-00000004 (train.snapshot_every")
    for command in (
        ["sample", kept, "--out", out],
        ["export", kept, "--out", tmp_path / "e.safetensors"],
    ):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, f"is a checkpoint of {teacher}: give the run")


def test_counts_of_one_are_singular_and_a_data_line_says_its_count_once(
    teacher, tiny_preset, image_folder, tmp_path, capsys
):
    """`wrote 1 images ... 1 steps, 1 network evaluations per image`; `data: 24 images from
    folder ... (24 images)`."""
    args = ["sample", teacher, "--num", 1, "--sampler", "euler", "--steps", 1]
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "one")
    assert code == 0, err
    assert "wrote 1 image to" in out and "(sampler euler, 1 step, 1 network evaluation per" in out
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--steps", 1]
    code, _, err = run_cli(capsys, *args, "--no-progress", "--out", tmp_path / "run")
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if "data: " in line]
    assert line.endswith(f"data: folder {image_folder} (24 images)"), line
