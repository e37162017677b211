"""Reliability, round seven (2026-11-29): what a new user's walk through every documented command
found, each case as a test."""

from __future__ import annotations

import json

from conftest import run_cli

from difflab.train.logs import read_metrics


def _train(capsys, tiny_preset, image_folder, out, *args):
    argv = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", out, *args]
    code, stdout, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 0, err
    return stdout, err


def test_a_resume_that_names_a_length_drops_the_last_invocations_time_limit(
    tiny_preset, image_folder, tmp_path, capsys
):
    """`train --time-limit 30` then `train --resume RUN --steps 20000` stopped again after 30
    minutes: the README's "continue (or extend) a run"."""
    run = tmp_path / "run"
    _train(capsys, tiny_preset, image_folder, run, "--time-limit", "0.0001")
    assert json.loads((run / "config.json").read_text())["train"]["time_limit"] == 0.0001
    code, out, err = run_cli(capsys, "train", "--resume", run, "--steps", 5, "--no-progress")
    assert code == 0 and "to step 5" in out and "stopped by steps" in out, err
    assert json.loads((run / "config.json").read_text())["train"]["time_limit"] == 0


def test_a_finished_run_that_cooled_down_is_told_to_start_from_its_weights(
    tiny_preset, image_folder, tmp_path, capsys
):
    """ "pass a larger --steps to extend it", which the resume then refused (its rates)."""
    run = tmp_path / "cool"
    cool = ["--set", "train.lr_schedule='cooldown'", "--set", "train.warmup_steps=0"]
    _train(capsys, tiny_preset, image_folder, run, "--steps", 10, *cool)  # step 9 cooled
    code, out, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 0 and f"cannot be lengthened: --init {run}" in out, err
    code, _, err = run_cli(capsys, "train", "--resume", run, "--steps", 12, "--no-progress")
    assert code != 0 and "would change the learning rate of a step it has taken" in err
    # 4 steps with a cool-down of its last 20%: all four at the full rate, so it can go on
    early = tmp_path / "early"
    _train(capsys, tiny_preset, image_folder, early, "--steps", 4, *cool)
    code, out, err = run_cli(capsys, "train", "--resume", early, "--no-progress")
    assert code == 0 and "pass a larger --steps or --images to extend it" in out, err
    plain = tmp_path / "plain"
    _train(capsys, tiny_preset, image_folder, plain, "--steps", 4)
    code, out, err = run_cli(capsys, "train", "--resume", plain, "--no-progress")
    assert code == 0 and "pass a larger --steps or --images to extend it" in out, err


def test_a_run_shorter_than_a_log_row_logs_its_steps_and_says_it_draws_its_pictures(
    tiny_preset, image_folder, tmp_path, capsys
):
    """No log.jsonl row (so no curves, no TensorBoard) below `train.log_every` steps; minutes of
    silence after the bar while the final pictures were sampled."""
    run = tmp_path / "short"
    _, err = _train(
        capsys, tiny_preset, image_folder, run, "--steps", 3, "--set", "train.log_every=20"
    )
    rows = [r for r in read_metrics(run / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [3]
    assert "drawing the final pictures: 4 samples in 4 sampler steps" in err


def test_init_says_where_its_weights_come_from(
    teacher, tiny_preset, image_folder, tmp_path, capsys
):
    _, err = _train(
        capsys, tiny_preset, image_folder, tmp_path / "r", "--init", teacher, "--steps", 1
    )
    assert f"starting from {teacher}" in err and "step 4, ema weights" in err
