"""Reliability, round five (2026-11-28): what the fifth hostile probe and the last round's
leftovers found, each case as a test."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import run_cli
from reliability import assert_one_line_error

import difflab
from difflab.config import MethodConfig, SamplerConfig
from difflab.plans import build_sampler
from difflab.registry import METHODS


def test_a_plan_runs_only_on_the_run_it_was_built_for(teacher):
    """A plan knows its method and process: one built for a flow model, or for an EDM model with
    another sigma_max, drove this EDM run's network on the wrong grid without a word."""
    run = difflab.load_run(teacher, device="cpu")
    edm = dataclasses.replace(run.config.method.edm, sigma_max=10.0)
    others = [
        build_sampler(METHODS["flow"](MethodConfig(name="flow")), SamplerConfig(steps=2)),
        build_sampler(METHODS["edm"](MethodConfig(name="edm", edm=edm)), SamplerConfig(steps=2)),
    ]
    for plan in others:
        with pytest.raises(difflab.DifflabError, match="this plan was built for another run"):
            run.sample(2, plan=plan)
    again = difflab.load_run(teacher, device="cpu").plan(steps=2)  # the same run, loaded again
    assert run.sample(2, plan=again).shape == (2, *run.image_shape)


def test_no_output_overwrites_a_runs_own_files_or_takes_another_suffix(
    teacher, tmp_path, image_folder, capsys
):
    """`eval --json` replaced reference statistics, a run's config.json or a checkpoint with its
    result, and `export --out` a checkpoint's weights: the run no longer loaded."""
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"statistics")
    kept = {
        p: p.read_bytes() for p in [teacher / "config.json", ref, *teacher.rglob("*.safetensors")]
    }
    ema = teacher / "checkpoints" / "step-00000004" / "ema.safetensors"
    calls = [
        (["eval", image_folder, "--ref", ref, "--json", ref], "--json"),
        (["eval", image_folder, "--ref", ref, "--json", ema.parent / ".." / "x.json"], "--json"),
        (["eval", image_folder, "--ref", ref, "--json", teacher / "config.json"], "--json"),
        (["export", teacher, "--out", ema], "--out"),
        (["export", teacher, "--format", "diffusers", "--out", ema.parent / "d"], "--out"),
        (["ref", image_folder, "--out", teacher / "log.jsonl"], "--out"),
    ]
    for args, flag in calls:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, f"difflab: error: {flag}")
    assert "the result must end in .json" in run_cli(capsys, *calls[0][0])[2]
    assert "is in" in run_cli(capsys, *calls[2][0])[2]
    link = tmp_path / "link"
    link.symlink_to(teacher / "checkpoints")
    code, _, err = run_cli(capsys, "sample", teacher, "--out", link / "s", "--num", 1)
    assert_one_line_error(code, err, f"is in {teacher.resolve()}'s own checkpoints")
    assert {p: p.read_bytes() for p in kept} == kept
    assert not (ema.parent / "d").exists()
    code, _, err = run_cli(capsys, "export", teacher, "--out", teacher / "model.safetensors")
    assert code == 0, err  # a file of its own in the run folder is fine
    project = tmp_path / "project"  # another tool's config.json and checkpoints: not a run
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text('{"lr": 1}')
    code, _, err = run_cli(
        capsys, "export", teacher, "--out", project / "checkpoints" / "m.safetensors"
    )
    assert code == 0, err


def test_an_export_holds_one_set_of_weights_and_says_which(teacher, tmp_path, capsys):
    """An export's --checkpoint, --raw and ema=False were ignored, and an export of a raw export
    was labelled EMA (and of an EMA one with --raw, raw)."""
    from safetensors import safe_open

    def weights(path):
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata()["weights"]

    raw, again, ema = (
        tmp_path / "raw.safetensors",
        tmp_path / "again.safetensors",
        tmp_path / "ema.safetensors",
    )
    for args in ([teacher, "--raw", "--out", raw], [raw, "--out", again], [teacher, "--out", ema]):
        code, _, err = run_cli(capsys, "export", *args)
        assert code == 0, err
    assert (weights(raw), weights(again), weights(ema)) == ("raw", "raw", "ema")
    refused = [
        ["export", ema, "--raw", "--out", tmp_path / "x.safetensors"],
        ["sample", ema, "--checkpoint", "step-00000003", "--out", tmp_path / "s"],
        ["sample", ema, "--no-ema", "--out", tmp_path / "s"],
    ]
    for args in refused:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "holds one set of weights (ema, step 4)")
    with pytest.raises(difflab.DifflabError, match="not raw weights"):
        difflab.load_run(ema, ema=False)
    assert difflab.load_run(raw, ema=False).weights == "raw"  # the raw export is raw weights


def test_a_model_guided_by_its_own_weights_is_refused(teacher, tmp_path, capsys):
    """`sample --guide RUN` on RUN itself (or its newest checkpoint) sampled the unguided model
    at twice the cost and called it guidance 2; distill refused the same already."""
    newest = teacher / "checkpoints" / "step-00000004"
    for guide in (teacher, newest):
        with pytest.raises(difflab.DifflabError, match="holds the model's own weights"):
            difflab.load_run(teacher, guide=guide)
    code, _, err = run_cli(capsys, "sample", teacher, "--guide", newest, "--out", tmp_path / "s")
    assert_one_line_error(code, err, "name a weaker model")
    earlier = difflab.load_run(teacher, guide=teacher / "checkpoints" / "step-00000003")
    assert earlier.guide is not None


def test_a_sample_cut_off_leaves_no_list_claiming_a_mix_of_images(
    teacher, tmp_path, image_folder, capsys, monkeypatch
):
    """A `sample` interrupted over an earlier one's folder left the earlier samples.json and
    grid.png: eval scored a mix of both requests as one complete set, without a word."""
    import difflab.viz

    out = tmp_path / "s"
    code, _, err = run_cli(capsys, "sample", teacher, "--num", 4, "--steps", 2, "--out", out)
    assert code == 0 and (out / "samples.json").is_file(), err
    save_images = difflab.viz.save_images

    def cut_off(images, folder, start_index=0):
        if start_index:
            raise KeyboardInterrupt
        save_images(images, folder, start_index=start_index)

    monkeypatch.setattr(difflab.viz, "save_images", cut_off)
    again = ["--num", 4, "--batch-size", 2, "--seed", 7, "--out", out]
    code, _, err = run_cli(capsys, "sample", teacher, *again)
    assert code == 130, err
    assert not (out / "samples.json").exists() and not (out / "grid.png").exists()
    ref = tmp_path / "ref.npz"
    assert run_cli(capsys, "ref", image_folder, "--out", ref, "--image-size", 8)[0] == 0
    code, _, err = run_cli(capsys, "eval", out, "--ref", ref, "--image-size", 8)
    assert code == 0 and "holds numbered samples but no samples.json" in err, err


def test_eval_scores_a_run_as_it_scores_its_samples_saved(teacher, tmp_path, image_folder, capsys):
    """eval FOLDER loaded images at --image-size (32 unless given) while eval RUN fed the run's
    own size to Inception: the same images scored two FIDs. A reference now records its size,
    and eval FOLDER refuses the options that only sampling a run uses."""
    ref, out = tmp_path / "ref.npz", tmp_path / "s"
    assert run_cli(capsys, "ref", image_folder, "--out", ref, "--image-size", 16)[0] == 0
    assert run_cli(capsys, "sample", teacher, "--num", 4, "--steps", 2, "--out", out)[0] == 0
    scores = []
    for source, more in ((out, []), (teacher, ["--num", 4, "--steps", 2])):
        result = tmp_path / f"{source.name}.json"
        args = ["--ref", ref, "--image-size", 16, "--json", result, *more]
        code, _, err = run_cli(capsys, "eval", source, *args)
        assert code == 0, err
        scores.append(json.loads(result.read_text())["fid"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)  # 8 px samples, each made 16 px
    code, _, err = run_cli(capsys, "eval", out, "--ref", ref, "--image-size", 32)
    assert_one_line_error(code, err, "holds images loaded at 16 px", "drop --image-size")
    result = tmp_path / "default.json"  # without --image-size: the reference's own size
    assert run_cli(capsys, "eval", out, "--ref", ref, "--json", result)[0] == 0
    assert json.loads(result.read_text())["fid"] == pytest.approx(scores[0], rel=1e-6)
    code, _, err = run_cli(capsys, "eval", out, "--ref", ref, "--image-size", 16, "--label", "a")
    assert_one_line_error(code, err, "--label: for a run;")


def test_report_reads_only_what_training_writes(teacher, tmp_path, capsys):
    """Log rows without a step, kimg or time, rows of strings, a log that is a folder and a
    picture named like a preview were "unexpected" KeyErrors, ValueErrors and AttributeErrors;
    a run with checkpoints but no log row yet said "not started"."""
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(teacher, odd)
    rows = ['{"step": 2, "loss": 1}', '{"kimg": 1, "loss": 1}', '{"step": "abc", "kimg": 1}',
            '{"step": 5, "kimg": "0.04", "loss": 1}', '{"step": 5, "kimg": 0.04, "fid": "x"}',
            '{"step": 9, "kimg": 0.07, "loss": 0.5}']  # fmt: skip
    with open(odd / "log.jsonl", "a") as log:
        log.write("\n".join(rows) + "\n")
    (odd / "pictures" / "samples-copykimg.png").write_bytes(b"x")
    (odd / "pictures" / "strip-xkimg.png").write_bytes(b"x")
    quiet = tmp_path / "quiet"  # a checkpoint, no log row: the log folder is in the way
    shutil.copytree(teacher, quiet)
    (quiet / "log.jsonl").unlink()
    (quiet / "log.jsonl").mkdir()
    out = tmp_path / "r.HTML"
    code, _, err = run_cli(capsys, "report", odd, quiet, "--out", out)
    assert code == 0, err
    page = out.read_text()
    assert "step 9, 0.1 kimg" in page  # the last row a training could have written
    assert "step 4 (its newest checkpoint; no log rows)" in page

    from difflab.train.logs import TrainLog

    TrainLog(odd, start_step=4).close()  # a resume keeps the rows it can read
    kept = [json.loads(line)["step"] for line in (odd / "log.jsonl").read_text().splitlines()]
    assert kept and max(kept) <= 4


def test_the_api_names_a_wrong_argument_in_one_line(teacher, tmp_path):
    """Paths, flags, plans and labels of the wrong type were TypeErrors, ValueErrors and
    AttributeErrors; plan() took guidance=, guide_at= and name= and then ignored them."""
    run = difflab.load_run(teacher)
    calls = [
        (lambda: difflab.load_run(123), "path must be a path"),
        (lambda: difflab.load_run(teacher, guide=123), "guide must be a path"),
        (lambda: difflab.load_run(teacher, ema="no"), "ema must be True or False"),
        (lambda: difflab.load_run(teacher, checkpoint=-1), "checkpoint (a step) must be"),
        (lambda: run.generate(1, record="yes"), "record must be True, False or a number"),
        (lambda: run.generate(1, plan="heun"), "plan must be a run.plan(...)"),
        (lambda: run.plan("heun", 2, guidance=3.0), "guidance: not a plan's option"),
        (lambda: run.plan("heun", 2, name="euler"), "name: not a plan's option"),
        (
            lambda: run.plan(foo=1),
            "known options: clip_x0, eta, grid, rho, s_churn, s_noise, s_tmax, s_tmin, sigma_max, "
            "steps, variance",
        ),
        (lambda: run.plan(7), "sampler must be a sampler's name"),
        (lambda: run.sample(2, label=1.0), "this run is unconditional"),
        (lambda: difflab.save_grid(torch.zeros(0, 3, 8, 8), tmp_path / "g.png"), "no images"),
        (lambda: difflab.save_grid([1, 2], tmp_path / "g.png"), "expected a tensor of images"),
    ]
    for call, message in calls:
        with pytest.raises(difflab.DifflabError, match=re.escape(message)):
            call()
    assert difflab.load_run(teacher, checkpoint=3).step == 3  # a step number names a checkpoint


def test_labels_may_be_a_tensor_of_class_indices():
    from difflab.classes import labels_for

    names = ["cars", "ships"]
    assert labels_for(torch.tensor([1, 0]), names, 2).tolist() == [1, 0]
    assert labels_for(torch.tensor(1), names, 2).tolist() == [1, 1]
    with pytest.raises(difflab.DifflabError, match="label must be a class name or index"):
        labels_for(1.0, names, 2)


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set"),
    ],
)
def test_torchruns_variables_set_wrong_are_one_line_before_the_data_loads(
    environment, message, tmp_path, tiny_preset, capsys, monkeypatch
):
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    missing = tmp_path / "no-data"  # not read: the variables are checked first
    args = ["--preset", tiny_preset, "--data", missing, "--out", tmp_path / "r", "--steps", 1]
    code, _, err = run_cli(capsys, "train", *args)
    assert_one_line_error(code, err, message, "launch with torchrun")
    assert not (tmp_path / "r").exists()


def test_sigterm_stops_a_command_as_ctrl_c_does(teacher, tmp_path, capsys):
    """SIGTERM killed sample, eval, export and report with the default action: no message, and
    a diffusers export's or report's temporary files left behind."""
    import signal
    import subprocess
    import sys
    import time

    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(capsys, "presets")[0] == 0
    assert signal.getsignal(signal.SIGTERM) == before  # main() restores what it changed
    out = tmp_path / "s"
    command = [sys.executable, "-m", "difflab", "sample", teacher, "--num", 100000,
               "--batch-size", 1, "--steps", 4, "--out", out]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "00001.png").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "difflab: terminated"
    assert not (out / "samples.json").exists()


def test_class_settings_given_by_set_are_the_users_not_the_presets(
    tmp_path, tiny_preset, image_folder, capsys
):
    """`--set data.class_name=X` on a flat folder was "the preset's default class, ignored"
    where `--class X` is refused; `--set data.class_names=[...]` on a new run failed after the
    data loaded, telling the user to resume, and left a run folder holding only its lock."""
    from conftest import make_images

    flat = make_images(tmp_path / "flat", 4, classes=("x",)) / "x"
    out = tmp_path / "r"
    base = ["train", "--preset", tiny_preset, "--out", out, "--steps", 1, "--no-progress"]
    code, _, err = run_cli(capsys, *base, "--data", flat, "--set", "data.class_name='cars'")
    assert_one_line_error(code, err, "flat folder of images with no classes; drop --class")
    code, _, err = run_cli(
        capsys, *base, "--data", image_folder, "--set", "data.class_names=['cars']"
    )
    assert_one_line_error(code, err, "learned from the data's class folders")
    assert not out.exists()


def test_second_read_of_round_five(
    teacher, tmp_path, tiny_preset, image_folder, capsys, monkeypatch
):
    """What a review of round five found: sample deleted a strip or GIF it was not asked to
    write again (training's own reverse-process.gif among them), a checkpoint could not be named
    by its step on the command line, a range or numpy array of labels was refused, learned class
    settings came in through a preset file, and WORLD_SIZE='²' was "unexpected"."""
    import numpy as np

    from difflab.classes import labels_for

    pictures = teacher / "pictures"
    gif = pictures / "reverse-process.gif"
    gif.write_bytes(b"a picture of the user's")
    code, out, err = run_cli(capsys, "sample", teacher, "--checkpoint", 3, "--out", pictures,
                             "--num", 2, "--steps", 2)  # fmt: skip
    assert code == 0 and "step 3 weights" in out, err
    assert gif.read_bytes() == b"a picture of the user's"
    names = ["cars", "ships"]
    assert labels_for(range(2), names, 2).tolist() == [0, 1]
    assert labels_for(np.array([1, 0]), names, 2).tolist() == [1, 0]
    assert labels_for(np.int64(1), names, 2).tolist() == [1, 1]
    preset = tmp_path / "classes.toml"
    preset.write_text(tiny_preset.read_text().replace("[data]", '[data]\nclass_names = ["a"]'))
    out = tmp_path / "r"
    args = ["--preset", preset, "--data", image_folder, "--out", out, "--steps", 1]
    code, _, err = run_cli(capsys, "train", *args)
    assert_one_line_error(code, err, "learned from the data's class folders, not set")
    assert not out.exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "\u00b2")
    code, _, err = run_cli(capsys, "train", *args[2:], "--preset", tiny_preset)
    assert_one_line_error(code, err, "is not a whole number")
