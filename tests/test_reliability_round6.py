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


def test_a_resume_past_a_damaged_checkpoint_keeps_the_checkpoints_it_writes(
    tiny_preset, image_folder, tmp_path, capsys
):
    """keep_last = 1, the newest checkpoint damaged: a resume from the one before deleted each
    checkpoint it wrote (the damaged folder counted as the newest) and said "trained to step 3"."""
    from difflab.train.checkpoint import list_checkpoints

    run = tmp_path / "run"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run, "--steps", 4]
    args += ["--checkpoint-every", 1, "--no-progress", "--set", "train.sample_every_kimg=0"]
    code, _, err = run_cli(
        capsys, *args, "--set", "train.keep_last=1", "--set", "train.snapshot_every=2"
    )
    assert code == 0, err
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    state = run / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    code, out, err = run_cli(capsys, "train", "--resume", run, "--steps", 3, "--no-progress")
    assert code == 0 and "skipping a damaged checkpoint" in err and "to step 3" in out, err
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["step-00000002", "step-00000003", "step-00000004"], names


def test_the_apis_picture_savers_keep_off_a_runs_files(teacher, tmp_path):
    """`difflab.save_grid(x, RUN / "config.json")` wrote a PNG over the run's config (and into
    its checkpoints); a folder as the path leaked a temporary file's name."""
    import pytest
    import torch

    import difflab

    images = torch.zeros(2, 3, 8, 8)
    config = (teacher / "config.json").read_bytes()
    weights = teacher / "checkpoints" / "step-00000004" / "grid.png"
    folder = tmp_path / "grid.png"
    folder.mkdir()
    calls = [
        (lambda: difflab.save_grid(images, teacher / "config.json"), "must end in .png"),
        (lambda: difflab.save_grid(images, weights), "is in "),
        (lambda: difflab.save_grid(images, folder), "is a folder; give a file name"),
        (lambda: difflab.viz.save_gif(images, teacher / "log.jsonl"), "must end in .gif"),
    ]
    for call, message in calls:
        with pytest.raises(difflab.DifflabError, match=message):
            call()
    assert (teacher / "config.json").read_bytes() == config and not weights.exists()
    assert difflab.save_grid(images, tmp_path / "GRID.PNG").is_file()


def test_a_pipe_named_like_an_image_is_skipped_not_waited_on(tmp_path, caplog):
    """`mkfifo data/pipe.png`: loading the folder waited for a writer for ever."""
    import os
    import threading

    from conftest import make_images

    from difflab.data import load_images

    folder = make_images(tmp_path / "data", 3, classes=("cars",)) / "cars"
    os.mkfifo(folder / "pipe.png")
    loaded = []
    worker = threading.Thread(target=lambda: loaded.append(load_images(str(folder), None, 8)))
    worker.daemon = True  # a hang must not keep the test process alive
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "loading waited on the pipe"
    assert len(loaded[0].images) == 3 and "skipped 1 unreadable image: pipe.png" in caplog.text


def test_resume_refuses_a_sampler_or_preset_and_may_keep_more_checkpoints(checkpointed, capsys):
    """`train --resume RUN --sampler euler` and `--preset tutorial` trained on without a word
    (the sampler unchanged); keep_last and snapshot_every, which compute nothing, were refused."""
    import json

    for flags in (["--sampler", "euler"], ["--preset", "tutorial"]):
        code, _, err = run_cli(capsys, "train", "--resume", checkpointed, "--steps", 8, *flags)
        assert_one_line_error(code, err, f"{flags[0]} cannot change when resuming")
    more = ["--set", "train.keep_last=5", "--set", "train.snapshot_every=4"]
    code, _, err = run_cli(capsys, "train", "--resume", checkpointed, "--steps", 7, *more)
    assert code == 0, err
    train = json.loads((checkpointed / "config.json").read_text())["train"]
    assert (train["keep_last"], train["snapshot_every"]) == (5, 4)


def test_a_length_set_by_set_replaces_the_presets_as_the_flags_do(
    tiny_preset, image_folder, tmp_path, capsys
):
    """`--set train.time_limit=...` kept the preset's 6 steps beside it (flow-cpu's 200,000: the
    run never cooled down nor got its guide); `--time-limit` replaced them."""
    import json

    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--set", "train.images=16", "--out", tmp_path / "r")
    assert code == 0, err
    train = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert (train["steps"], train["images"]) == (0, 16)


def test_distill_refuses_another_teacher_by_set_and_data_of_other_classes_first(
    teacher, tmp_path, capsys
):
    """`--set method.consistency.teacher=OTHER` distilled from OTHER while the config named
    RUN_DIR; data without the teacher's classes said "resume with the data it was trained on"
    and left a folder behind."""
    from conftest import make_images

    out = tmp_path / "student"
    args = ["distill", teacher, "--out", out, "--steps", 1, "--no-progress"]
    for setting in ("teacher", "teacher_guide", "teacher_guidance"):
        code, _, err = run_cli(capsys, *args, "--set", f"method.consistency.{setting}=1")
        assert_one_line_error(code, err, f"--set method.consistency.{setting}: distill's RUN_DIR")
    conditional = tmp_path / "cond"
    images = make_images(tmp_path / "three", 4, classes=("a", "b", "c"))
    code, _, err = run_cli(
        capsys, "train", "--preset", "flow-cpu-cond", "--data", make_images(conditional, 4),
        "--steps", 1, "--batch-size", 4, "--set", "network.unet.channels=8",
        "--set", "data.image_size=8", "--no-progress", "--out", tmp_path / "c",
    )  # fmt: skip
    assert code == 0, err
    init = ["train", "--preset", "flow-cpu-cond", "--data", conditional, "--steps", 1]
    init += ["--batch-size", 4, "--set", "network.unet.channels=8", "--set", "data.image_size=8"]
    code, _, err = run_cli(capsys, *init, "--init", tmp_path / "c", "--out", tmp_path / "c2")
    assert code == 0, err  # --init from a conditional run: its classes are learned later
    distill = ["distill", tmp_path / "c", "--out", out, "--data", images, "--steps", 1]
    code, _, err = run_cli(capsys, *distill)
    assert_one_line_error(code, err, "the run learned the classes 0=cars, 1=ships, but")
    assert "give data with those class folders" in err and not out.exists()


def test_a_resume_refuses_other_data_and_a_hand_edited_config(
    tiny_preset, image_folder, tmp_path, capsys
):
    """A resume read whatever the data folder held by then (its own pictures, a sample's
    samples.json, added images) and trained on; a hand-edited optimizer gave "unexpected
    KeyError", edited channels called intact checkpoints damaged."""
    import json
    import shutil

    from conftest import make_images

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    run = tmp_path / "run"
    args = ["train", "--preset", tiny_preset, "--data", data, "--steps", 3, "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--out", data / "run")
    assert_one_line_error(code, err, "is inside the data folder")
    code, _, err = run_cli(capsys, *args, "--out", run)
    assert code == 0, err
    make_images(data / "cars", 1, seed=5, classes=("more",))  # one image more
    resume = ["train", "--resume", run, "--steps", 6, "--no-progress"]
    code, _, err = run_cli(capsys, *resume)
    assert_one_line_error(code, err, f"the data is not what {run} was trained on (24 images -> 25")
    shutil.rmtree(data)
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    saved = json.loads((run / "config.json").read_text())
    resume += ["--data", moved]
    for key, value, shown in [("optimizer", "sgd", "train.optimizer: 'adam' -> 'sgd'"),
                              ("seed", 7, "train.seed: 0 -> 7")]:  # fmt: skip
        edited = {**saved, "train": {**saved["train"], key: value}}
        (run / "config.json").write_text(json.dumps(edited))
        code, _, err = run_cli(capsys, *resume)
        assert_one_line_error(code, err, "config.json differs from the config its checkpoints")
        assert shown in err
    (run / "config.json").write_text(json.dumps(saved))
    code, _, err = run_cli(capsys, *resume)  # the same images, moved: resumes with --data
    assert code == 0, err
    make_images(moved, 1, seed=5)  # as many images, other pixels (or another decoder): said
    code, _, err = run_cli(capsys, "train", "--resume", run, "--steps", 7, "--no-progress")
    assert code == 0 and "the images' pixels differ from those" in err, err


def test_samples_and_data_stay_apart(teacher, image_folder, tmp_path, capsys):
    """`sample --out DATA` left a samples.json that made every later reader of DATA see only
    the samples."""
    import shutil

    from difflab.data import load_images

    data = tmp_path / "flat"
    shutil.copytree(image_folder / "cars", data)
    code, _, err = run_cli(capsys, "sample", teacher, "--num", 2, "--steps", 1, "--out", data)
    assert_one_line_error(code, err, "holds images that difflab sample does not write")
    samples = tmp_path / "samples"
    code, _, err = run_cli(capsys, "sample", teacher, "--num", 2, "--steps", 1, "--out", samples)
    assert code == 0, err
    assert len(load_images(str(samples), None, 8).images) == 2
    shutil.copy(next(data.iterdir()), samples / "real.png")  # mixed by hand
    import pytest

    from difflab.errors import DifflabError

    with pytest.raises(DifflabError, match=r"holds difflab samples .* and 1 other images"):
        load_images(str(samples), None, 8)


def test_init_from_another_network_is_one_line_before_the_data_loads(
    teacher, tiny_preset, image_folder, tmp_path, capsys
):
    """`train --init RUN` of another network: four lines calling good checkpoints damaged
    (torch's reason cut off) after the data loaded, and a folder holding only .lock."""
    import torch

    from difflab.errors import DifflabError
    from difflab.train.checkpoint import load_weights_into

    out = tmp_path / "new"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", out, "--steps", 1]
    code, _, err = run_cli(capsys, *args, "--init", teacher, "--set", "network.unet.channels=16")
    assert_one_line_error(code, err, "holds another network (network.unet.channels: 8 there, 16")
    assert "data:" not in err and not out.exists()
    code, _, err = run_cli(capsys, *args, "--init", teacher, "--set", "method.name='flow'")
    assert (
        code == 0 and "was trained as edm: its weights learned another task than flow's" in err
    ), err
    net = torch.nn.Linear(2, 3)
    try:
        load_weights_into(net, {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, tmp_path)
    except DifflabError as error:
        assert "weight: (3, 4) there, (3, 2) here" in str(error)
    else:
        raise AssertionError("loaded weights of another shape")


def test_small_things_of_round_six(teacher, tiny_preset, image_folder, tmp_path, capsys):
    """`-q` showed training's bar; a preset file named .TOML was "unknown preset"; version 99
    said nothing to do; the tutorial sampler told API users to drop a --steps flag."""
    import shutil

    import pytest

    import difflab
    from difflab.config import load_preset

    upper = tmp_path / "P.TOML"
    shutil.copy(tiny_preset, upper)
    assert load_preset(str(upper)).network.name == "unet"
    future = tmp_path / "future.toml"
    future.write_text(tiny_preset.read_text().replace("[data]", "version = 99\n[data]"))
    with pytest.raises(difflab.DifflabError, match="drop version from the preset"):
        difflab.config.validate(load_preset(str(future)))
    args = ["-q", "train", "--preset", tiny_preset, "--data", image_folder, "--steps", 2]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "q")
    assert code == 0 and "it/s" not in err and "%|" not in err, err
    run = difflab.load_run(teacher)
    with pytest.raises(difflab.DifflabError, match="keeps every step of 100,000 images: 768 GB"):
        run.generate(100_000, record=True, sampler="euler", steps=10_000)
    assert run.generate(2, record=1, sampler="euler", steps=2).frames.shape[1] == 1
