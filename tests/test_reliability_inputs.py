"""Reliability, round two (issue 18): what a hostile probe found, each case as a test.

Bounded memory, one-line advice instead of "unexpected" errors, files readable by others,
decompression bombs skipped, no silent substitutes, and messages that name the key and value.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from conftest import make_images, run_cli
from PIL import Image

from difflab.metrics.fid import FeatureStats, save_stats


@pytest.fixture
def trained(tmp_path, tiny_preset, image_folder, capsys) -> Path:
    run_dir = tmp_path / "run"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    code, _, err = run_cli(capsys, *args, "--steps", 3, "--no-progress")
    assert code == 0, err
    return run_dir


@pytest.fixture
def odd_files(tmp_path) -> Path:
    """A plain file, a binary "preset", an empty preset, a folder named like a preset."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"learning_rate": 0.1}')
    (tmp_path / "weights.bin").write_bytes(os.urandom(5000))
    return tmp_path


def _one_line(code: int, err: str, *fragments: str) -> str:
    assert code != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: error: "), err
    assert "error: unexpected" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


# --------------------------------------------------------------------------- 1. memory, time


def test_an_absurd_step_count_is_refused_up_front_naming_the_limit(trained, tmp_path, capsys):
    start = time.monotonic()
    args = ["sample", trained, "--num", 1, "--out", tmp_path / "s", "--steps", 1_000_000_000]
    _one_line(*run_cli(capsys, *args)[::2], "argument --steps", "[1, 10000]", "1000000000")
    assert time.monotonic() - start < 5 and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("option", "value", "limit"),
    [
        ("--steps", 0, "[1, 10000]"),
        ("--num", 10**9, "[1, 100000]"),
        ("--batch-size", 10**6, "[1, 1024]"),
        ("--seed", -1, "[0, "),
    ],
)
def test_sample_options_are_bounded(trained, tmp_path, capsys, option, value, limit):
    args = ["sample", trained, "--out", tmp_path / "s", option, value]
    _one_line(*run_cli(capsys, *args)[::2], f"argument {option}", limit)


def test_recorded_frames_follow_the_pictures_asked_for(trained, tmp_path, capsys):
    """--gif keeps 16 images' states as uint8, not the whole batch's as float."""
    from difflab import load_run

    run = load_run(trained, device="cpu")
    generated = run.generate(40, record=16)
    assert generated.frames.dtype.is_floating_point is False
    assert tuple(generated.frames.shape[:2]) == (run.plan().num_steps + 1, 16)
    args = ["sample", trained, "--num", 40, "--out", tmp_path / "s", "--gif", "--strip"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    with Image.open(tmp_path / "s" / "reverse-process.gif") as gif:
        assert gif.size[0] == (4 * 10 + 2) * 4  # a 4 x 4 grid of 8-pixel images, enlarged 4x


# --------------------------------------------------------------------------- 2. no "unexpected"


def test_link_loops_and_dangling_links_in_the_data_are_skipped(
    tmp_path, tiny_preset, image_folder, capsys
):
    cars = image_folder / "cars"
    os.symlink("self.png", cars / "self.png")  # a link to itself: ELOOP
    os.symlink("nowhere.png", cars / "dangling.png")
    os.symlink(".", cars / "again")  # a folder loop: walked once, not forty times
    os.symlink("loop-b", image_folder / "loop-a")  # loops among the class folders
    os.symlink("loop-a", image_folder / "loop-b")
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", tmp_path / "r"]
    code, _, err = run_cli(capsys, *args, "--steps", 1, "--no-progress")
    assert code == 0, err
    assert "skipped 2 unreadable images: cars/dangling.png, cars/self.png" in err
    assert "(24 images)" in err, err  # 12 cars + 12 ships, each once


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "--out", "{d}/afile/run"], ["afile is a file, not a folder"]),
        (["train", "--preset", "{d}/binary.toml"], ["not a text (UTF-8 TOML) file"]),
        (["sample", "{run}", "--steps", "-1", "--out", "{d}/s"], ["argument --steps", "'-1'"]),
        (["sample", "{run}", "--out", "{d}/afile"], ["afile exists and is not a folder"]),
        (["export", "{run}", "--out", "{d}/afile/m.safetensors"], ["afile is a file"]),
    ],
    ids=[
        "out-under-a-file",
        "binary-preset",
        "negative-steps",
        "out-is-a-file",
        "export-under-file",
    ],
)
def test_the_five_unexpected_errors_are_advice_now(
    trained, odd_files, tiny_preset, image_folder, capsys, argv, fragments
):
    argv = [a.format(d=odd_files, run=trained) for a in argv]
    if argv[0] == "train":
        argv += ["--data", str(image_folder), "--steps", "1"]
        argv += [] if "--preset" in argv else ["--preset", str(tiny_preset)]
        argv += [] if "--out" in argv else ["--out", str(odd_files / "r")]
    start = time.monotonic()
    _one_line(*run_cli(capsys, *argv)[::2], *fragments)
    assert time.monotonic() - start < 5  # refused before any sampling or training


# --------------------------------------------------------------------------- 3. file modes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_difflab_writes_has_the_mode_open_gives(
    tmp_path, tiny_preset, image_folder, capsys, mask
):
    previous = os.umask(mask)
    try:
        run = tmp_path / "run"
        args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run]
        assert run_cli(capsys, *args, "--steps", 3, "--no-progress")[0] == 0
        assert run_cli(capsys, "sample", run, "--num", 2, "--out", tmp_path / "s", "--gif")[0] == 0
        assert run_cli(capsys, "export", run, "--out", tmp_path / "m.safetensors")[0] == 0
        save_stats(FeatureStats(*_tiny_stats()), tmp_path / "ref.npz")
    finally:
        os.umask(previous)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and ".lock" not in p.name]
    files = [p for p in files if not p.is_relative_to(image_folder) and p.suffix != ".toml"]
    kinds = {p.suffix for p in files}
    assert {".png", ".gif", ".safetensors", ".pt", ".json", ".npz", ".jsonl"} <= kinds, kinds
    wrong = {
        str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) != 0o666 & ~mask
    }
    assert wrong == {}, wrong


def _tiny_stats():
    import numpy as np

    features = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    return features.mean(0), np.cov(features, rowvar=False), features, 10, {}


# --------------------------------------------------------------------------- 4. bombs


def test_a_decompression_bomb_is_skipped_with_difflabs_own_warning(tmp_path, tiny_preset, capsys):
    folder = make_images(tmp_path / "images", 6, classes=("cars",))
    Image.new("L", (12_000, 12_000)).save(folder / "cars" / "bomb.png")  # about 140 KB
    assert (folder / "cars" / "bomb.png").stat().st_size < 1_000_000
    args = ["train", "--preset", tiny_preset, "--data", folder, "--out", tmp_path / "r"]
    code, _, err = run_cli(capsys, *args, "--steps", 1, "--no-progress")
    assert code == 0, err
    assert "skipped 1 image over 64 megapixels: cars/bomb.png" in err
    assert "DecompressionBomb" not in err and "PIL" not in err, err
    assert all(line.startswith("difflab: ") for line in err.splitlines()), err


# --------------------------------------------------------------------------- 5-6. no silent defaults


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["train", "--preset", "{d}/empty.toml"], ["does not set method.name and network.name"]),
        (["train", "--time-limit", "0"], ["argument --time-limit", "(0, "]),
        (["sample", "{run}", "--seed", "-1", "--out", "{d}/s"], ["argument --seed"]),
        (["train", "--init", "{d}/missing.safetensors"], ["--init", "missing.safetensors does not"]),
        (["train", "--preset", "{d}/folder.toml"], ["folder.toml is a folder; give a .toml file"]),
        (["train", "--resume", "{d}/foreign"], ["not a difflab config", "not written by"]),
        (["train", "--set", "train.ema_halflife_kimg=nan"], ["train.ema_halflife_kimg", "nan"]),
        (["train", "--set", "train.grad_clip=-1"], ["train.grad_clip must be", "got -1.0"]),
        (["ref", "{image_folder}", "--out", "{d}/r.npz", "--inception", "{d}/weights.bin"], []),
    ],
    ids=[
        "empty-preset", "time-limit-0", "sample-seed", "init-missing", "preset-folder",
        "resume-foreign", "ema-nan", "grad-clip", "inception-file",
    ],
)  # fmt: skip
def test_no_silent_substitute_and_messages_that_name_the_input(
    trained, odd_files, tiny_preset, image_folder, capsys, argv, fragments
):
    argv = [a.format(d=odd_files, run=trained, image_folder=image_folder) for a in argv]
    if argv[0] == "train" and "--resume" not in argv:
        argv += ["--data", str(image_folder), "--out", str(odd_files / "r"), "--steps", "1"]
        argv += [] if "--preset" in argv else ["--preset", str(tiny_preset)]
    line = _one_line(*run_cli(capsys, *argv)[::2], *fragments)
    if "--inception" in argv:  # the underlying message is cut at a word, not mid-word
        assert "cannot load Inception weights" in line and "...)" in line
        cut = line.split("...)")[0]
        assert cut[-1].isalnum() and len(line) < 400, line
    assert not (odd_files / "r").exists()
