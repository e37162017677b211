"""The command line end to end on tiny synthetic data, and every user mistake it must catch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

import difflab


@pytest.fixture
def trained(tmp_path, tiny_preset, image_folder, capsys):
    run_dir = tmp_path / "run"
    code, _out, err = run_cli(
        capsys,
        "train",
        "--preset",
        tiny_preset,
        "--data",
        image_folder,
        "--out",
        run_dir,
        "--steps",
        3,
        "--no-progress",
    )
    assert code == 0, err
    return run_dir


def test_presets_lists_exact_parameter_counts(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["tutorial"][3] == "4281091"
    assert rows["tutorial-keras"][3] == "3586819"
    assert {
        "ddpm-cpu",
        "ddpm-paper",
        "ddpm-cosine-cpu",
        "flow-cpu",
        "flow-paper",
        "edm-cpu",
        "edm-paper",
    } <= set(rows)
    assert abs(int(rows["edm-paper"][3]) - 35_700_000) < 0.01 * 35_700_000
    # counted on the meta device (no memory, no arithmetic): as a real network counts
    from difflab.config import load_preset
    from difflab.models import count_parameters, forward_gflops
    from difflab.registry import build_network

    real = build_network(load_preset("flow-cpu"))
    assert rows["flow-cpu"][3:5] == [
        str(count_parameters(real)),
        f"{forward_gflops(real, 3, 32):.3f}",
    ]


def test_train_writes_the_run_directory(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["train"]["steps"] == 3 and config["method"]["name"] == "edm"
    assert (trained / "log.jsonl").exists() and (trained / "tensorboard").is_dir()
    assert (trained / "checkpoints" / "step-00000003" / "net.safetensors").exists()
    assert (trained / "checkpoints" / "step-00000003" / "ema.safetensors").exists()
    pictures = {p.name for p in (trained / "pictures").iterdir()}
    assert {
        "schedule.png",
        "training-images.png",
        "forward-process.png",
        "samples-latest.png",
    } <= pictures


def test_a_time_limit_replaces_the_presets_length_and_fixes_a_cooldown(
    tmp_path, tiny_preset, image_folder, capsys
):
    """--time-limit alone: not the preset's 6 steps, but the steps that fit, in config.json.
    The limit (9 s) leaves room for the 25 timed steps on a loaded machine: 3 s did not, beside
    a distillation and an evaluation on 2 cores."""
    run_dir = tmp_path / "clock"
    code, _, err = run_cli(capsys, "train", "--preset", tiny_preset, "--data", image_folder,
                           "--out", run_dir, "--time-limit", 0.15, "--no-progress",
                           "--set", "train.lr_schedule='cooldown'",
                           "--set", "train.sample_every_kimg=0")  # fmt: skip
    assert code == 0, err
    steps = json.loads((run_dir / "config.json").read_text())["train"]["steps"]
    assert steps > 6 and "the run's length is now" in err


def test_sample_is_deterministic_whatever_the_batch_size(trained, tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        "sample",
        trained,
        "--num",
        5,
        "--out",
        tmp_path / "a",
        "--seed",
        3,
        "--strip",
        "--gif",
    )
    assert code == 0, err
    assert "network evaluations" in out
    code, _, err = run_cli(
        capsys,
        "sample",
        trained,
        "--num",
        5,
        "--out",
        tmp_path / "b",
        "--seed",
        3,
        "--batch-size",
        2,
    )
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "a").glob("0*.png"))
    assert names == [f"{i:05d}.png" for i in range(5)]
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in ("a", "b"))
        assert a.shape == (8, 8, 3) and np.array_equal(a, b)
    assert (tmp_path / "a" / "grid.png").exists() and (tmp_path / "a" / "strip.png").exists()
    assert (tmp_path / "a" / "reverse-process.gif").exists()
    code, _, _ = run_cli(
        capsys, "sample", trained, "--num", 5, "--out", tmp_path / "c", "--seed", 4
    )
    other = np.asarray(Image.open(tmp_path / "c" / "00000.png"))
    assert not np.array_equal(other, np.asarray(Image.open(tmp_path / "a" / "00000.png")))


def test_any_compatible_sampler_and_step_count(trained, tmp_path, capsys):
    for sampler, steps in [("edm-stochastic", 3), ("euler", 1), ("heun", 2), ("dpm++2m", 3)]:
        code, out, err = run_cli(
            capsys,
            "sample",
            trained,
            "--num",
            2,
            "--out",
            tmp_path / sampler,
            "--sampler",
            sampler,
            "--steps",
            steps,
        )
        assert code == 0, err
    assert "3 network evaluations" in out  # dpm++2m: one per step


def test_python_api_three_lines(trained, tmp_path):
    run = difflab.load_run(trained)
    images = run.sample(4, seed=0)
    difflab.save_grid(images, tmp_path / "grid.png")
    assert images.shape == (4, 3, 8, 8) and (tmp_path / "grid.png").exists()
    assert torch.equal(images, difflab.load_run(trained).sample(4, seed=0))


def test_export_then_load_and_init(trained, tmp_path, tiny_preset, image_folder, capsys):
    out_file = tmp_path / "model.safetensors"
    code, _, err = run_cli(capsys, "export", trained, "--out", out_file)
    assert code == 0, err
    exported = difflab.load_run(out_file).sample(2, seed=1)
    assert torch.equal(exported, difflab.load_run(trained).sample(2, seed=1))
    code, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        tiny_preset,
        "--data",
        image_folder,
        "--out",
        tmp_path / "init",
        "--steps",
        1,
        "--init",
        out_file,
        "--no-progress",
    )
    assert code == 0, err


def test_resume_extends_a_run(trained, capsys):
    code, out, err = run_cli(capsys, "train", "--resume", trained, "--steps", 5, "--no-progress")
    assert code == 0, err
    assert "step 5" in out
    code, out, _ = run_cli(capsys, "train", "--resume", trained, "--steps", 5, "--no-progress")
    assert code == 0 and "already reached" in out


def test_method_flag_brings_its_own_default_sampler(tmp_path, image_folder, capsys):
    args = [
        "train",
        "--preset",
        "flow-cpu",
        "--method",
        "tutorial",
        "--data",
        image_folder,
        "--class",
        "cars",
    ]
    args += ["--out", tmp_path / "r", "--steps", 1, "--no-progress", "--set", "data.image_size=8"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["method"]["name"] == "tutorial" and config["sampler"]["name"] == ""


def test_tutorial_preset_defaults_to_the_car_class(tmp_path, image_folder, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (image_folder / "cars").glob("*.png"):
        (flat / p.name).write_bytes(p.read_bytes())
    code, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        "tutorial",
        "--data",
        flat,
        "--out",
        tmp_path / "t",
        "--steps",
        1,
        "--set",
        "data.image_size=8",
        "--no-progress",
    )
    assert code == 0, err
    assert "automobile" in err  # the note that the preset's class was ignored on a flat folder
    assert json.loads((tmp_path / "t" / "config.json").read_text())["data"]["class_name"] is None


BAD_TRAIN = [
    (["--preset", "nope"], "unknown preset"),
    (["--set", "train.nope=1"], "unknown setting train.nope"),
    (["--set", "train.lr=fast"], "expected a number"),
    (["--set", "train.batch_size=0"], "train.batch_size must be an integer in [1, 16384], got 0"),
    (["--steps", "-4"], "argument --steps: must be an integer in [1, "),
    (["--set", "train.lr=nan"], "train.lr must be a number > 0, got nan"),
    (["--set", "data.image_size=9"], "divisible"),
    (["--set", "train.lr"], "expected key=value"),
    (["--method", "magic"], "unknown method"),
    (["--network", "resnet"], "unknown network"),
    (["--sampler", "ddim"], "needs a DDPM-family"),
    (["--class", "planes"], "unknown class"),
    (["--device", "cuda:7"], "CUDA"),
    (["--data", "/does/not/exist"], "does not exist"),
]


@pytest.mark.parametrize(("args", "message"), BAD_TRAIN)
def test_bad_train_input_is_one_line(tmp_path, tiny_preset, image_folder, capsys, args, message):
    base = [
        "train",
        "--preset",
        tiny_preset,
        "--data",
        image_folder,
        "--out",
        tmp_path / "r",
        "--no-progress",
    ]
    code, _, err = run_cli(capsys, *base, *args)
    assert code != 0
    assert err.startswith("difflab: error:") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_sample_and_run_dir_input(trained, tmp_path, capsys, tiny_preset, image_folder):
    cases = [
        (["sample", tmp_path / "missing", "--out", tmp_path / "o"], "does not exist"),
        (
            ["sample", trained, "--out", tmp_path / "o", "--sampler", "tutorial"],
            "needs a model of the tutorial",
        ),
        (["sample", trained, "--out", tmp_path / "o", "--sampler", "warp"], "unknown sampler"),
        (
            ["sample", trained, "--out", tmp_path / "o", "--num", 0],
            "argument --num: must be an integer in [1, 100000], got '0'",
        ),
        (
            ["train", "--preset", tiny_preset, "--data", image_folder, "--out", trained],
            "already holds a run",
        ),
        (["train", "--resume", trained, "--method", "flow"], "cannot change when resuming"),
        (["train", "--resume", tmp_path / "nothing"], "does not exist"),
        (["frobnicate"], "invalid choice"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_empty_folder_is_a_clear_error(tmp_path, tiny_preset, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        tiny_preset,
        "--data",
        tmp_path / "empty",
        "--out",
        tmp_path / "r",
    )
    assert code != 0 and "no image" in err.lower()


def test_tutorial_sampler_only_runs_its_sixteen_levels(tmp_path, image_folder, capsys):
    run_dir = tmp_path / "tut"
    code, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        "tutorial",
        "--data",
        image_folder,
        "--class",
        "cars",
        "--out",
        run_dir,
        "--steps",
        1,
        "--set",
        "data.image_size=8",
        "--no-progress",
    )
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", run_dir, "--out", tmp_path / "s", "--steps", 8)
    assert code != 0 and "only runs the 16 levels" in err
    code, out, err = run_cli(capsys, "sample", run_dir, "--out", tmp_path / "s", "--num", 2)
    assert code == 0 and "16 network evaluations" in out


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "difflab", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "train" in result.stdout


def test_a_sample_folder_lists_its_samples_so_eval_skips_the_pictures(trained, tmp_path, capsys):
    """grid.png, strip.png and the GIF beside the samples are not samples (they used to be
    scored with them)."""
    from difflab.data import load_images

    out = tmp_path / "s"
    code, _, err = run_cli(capsys, "sample", trained, "--num", 5, "--out", out, "--strip", "--gif")
    assert code == 0, err
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["images"] == [f"{i:05d}.png" for i in range(5)] and manifest["label"] is None
    assert {"grid.png", "strip.png", "reverse-process.gif"} <= {p.name for p in out.iterdir()}
    assert len(load_images(str(out), None, 8)) == 5


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_debug_go_before_or_after_the_command(trained, tmp_path, capsys, where):
    from difflab.cli import build_parser

    command = ["sample", str(trained), "--num", "2", "--out", str(tmp_path / "q")]
    argv = ["-q", "--debug", *command] if where == "before" else [*command, "-q", "--debug"]
    args = build_parser().parse_args(argv)
    assert args.quiet and args.debug and not build_parser().parse_args(command).quiet
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "sampling" not in err  # no progress bar
    code, _, err = run_cli(capsys, *command[:-1], tmp_path / "loud")
    assert code == 0 and "sampling" in err
