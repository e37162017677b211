"""The trainer: loss goes down, resume is exact, schedules, logs and pictures."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from difflab.config import TrainConfig, apply_overrides, load_json, load_preset, validate
from difflab.data import load_images
from difflab.train.batches import batch_indices, images_before
from difflab.train.checkpoint import list_checkpoints
from difflab.train.loop import train
from difflab.train.schedule import cooldown_start, ema_beta, lr_at


def _config(preset, folder, *overrides):
    config = load_preset(str(preset))
    return validate(apply_overrides(config, [f'data.source="{folder}"', *overrides]))


def _weights(run_dir, name="net"):
    newest = list_checkpoints(run_dir)[-1]
    return load_file(str(newest / f"{name}.safetensors"))


def test_tutorial_lr_schedule_is_rounds_of_times_point_nine():
    t = TrainConfig(lr=8e-4, lr_schedule="rounds", round_steps=2000, round_decay=0.9, min_lr=1e-6)
    assert lr_at(0, t) == 8e-4 and lr_at(1999, t) == 8e-4
    assert lr_at(2000, t) == pytest.approx(8e-4 * 0.9)
    assert lr_at(19999, t) == pytest.approx(8e-4 * 0.9**9)
    assert lr_at(10**7, t) == 1e-6  # floored at min_lr


def test_warmup_and_cosine_do_not_depend_on_run_length():
    t = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="cosine", cosine_steps=100, min_lr=0.0)
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(60, t) == pytest.approx(0.5e-3)
    assert lr_at(500, t) == pytest.approx(0.0)


def test_cooldown_holds_the_rate_then_ends_at_min_lr_at_the_planned_length():
    t = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="cooldown", steps=100, min_lr=0.0)
    assert lr_at(4, t) == pytest.approx(0.5e-3) and lr_at(79, t) == 1e-3
    assert lr_at(80, t) == pytest.approx(1e-3) and lr_at(90, t) == pytest.approx(0.5e-3)
    assert lr_at(99, t) == pytest.approx(0.05e-3) and lr_at(100, t) == 0.0
    by_images = dataclasses.replace(t, steps=0, images=3190, batch_size=32)  # 100 batches
    assert [lr_at(s, by_images) for s in range(101)] == [lr_at(s, t) for s in range(101)]
    by_clock = dataclasses.replace(t, steps=0, time_limit=1.0)  # not planned yet: stable
    assert lr_at(99, by_clock) == 1e-3


def test_a_time_limit_becomes_steps_once_and_resumes_exactly(tmp_path, tiny_preset, image_folder):
    """--time-limit with the cooldown schedule: the measured length lands in config.json before
    the rate depends on it, so (stopped by the clock, resumed to the end) == a run told the
    same number of steps from the start."""
    quiet = [
        "train.lr_schedule='cooldown'",
        "train.checkpoint_every=1000000",
        "train.sample_every_kimg=0",
    ]
    config = _config(tiny_preset, image_folder, *quiet, "train.steps=0", "train.time_limit=0.05")
    data = load_images(str(image_folder), None, 8)
    result = train(config, tmp_path / "clock", data=data, progress=False)
    planned = load_json(tmp_path / "clock" / "config.json")
    steps = planned.train.steps
    assert steps >= 25 and cooldown_start(planned.train) >= 25, steps
    if result.step < steps:  # the clock ran out first: resume to the planned end
        longer = apply_overrides(planned, ["train.time_limit=10"])
        result = train(longer, tmp_path / "clock", resume=True, data=data, progress=False)
    assert result.step == steps and result.stopped_by == "steps"
    straight = _config(tiny_preset, image_folder, *quiet, f"train.steps={steps}")
    train(straight, tmp_path / "steps", data=data, progress=False)
    for name in ("net", "ema"):
        a, b = _weights(tmp_path / "clock", name), _weights(tmp_path / "steps", name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ"


def test_ema_half_life_counts_images_and_ramps_up():
    t = TrainConfig(ema_halflife_kimg=500, ema_rampup=0.05)
    # early: half-life = 5% of 10,000 images = 500 images; a batch of 500 halves the weight
    assert ema_beta(500, 10_000, t) == pytest.approx(0.5)
    # late: the half-life is capped at 500k images
    assert ema_beta(500, 10**9, t) == pytest.approx(0.5 ** (500 / 500_000))


def test_pytorch_notebook_batching_is_shuffled_epochs_with_a_short_last_batch(
    tiny_preset, image_folder
):
    config = _config(tiny_preset, image_folder, "train.batching='epochs'", "train.batch_size=10")
    # 24 images, batch 10: batches of 10, 10, 4 per epoch
    sizes = [len(batch_indices(s, 24, config)) for s in range(6)]
    assert sizes == [10, 10, 4, 10, 10, 4]
    assert sorted(torch.cat([batch_indices(s, 24, config) for s in range(3)]).tolist()) == list(
        range(24)
    )
    assert images_before(3, 24, config) == 24 and images_before(4, 24, config) == 34


def test_tiny_run_learns(tmp_path, image_folder):
    """The tutorial method and network on 8x8 synthetic images: the L1 loss goes down."""
    config = validate(
        apply_overrides(
            load_preset("tutorial"),
            [
                f'data.source="{image_folder}"',
                "data.class_name='cars'",
                "data.image_size=8",
                "train.batch_size=12",
                "train.steps=60",
                "train.log_every=5",
                "train.sample_every_kimg=0",
            ],
        )
    )
    data = load_images(str(image_folder), "cars", 8)
    result = train(config, tmp_path / "run", data=data, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert result.step == 60 and len(rows) == 12
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.6 * first
    pictures = {p.name for p in (tmp_path / "run" / "pictures").iterdir()}
    assert {
        "schedule.png",
        "training-images.png",
        "forward-process.png",
        "reverse-process.gif",
    } <= pictures
    assert (tmp_path / "run" / "loss.png").exists()


@pytest.mark.parametrize("method", ["edm", "tutorial"])
def test_resume_is_bit_identical(tmp_path, tiny_preset, image_folder, method):
    """6 steps straight == 3 steps, stop, resume to 6: the same weights to the last bit."""
    overrides = [f"method.name='{method}'", "sampler.name=''", "sampler.steps=0"]
    if method == "tutorial":  # also the PyTorch notebook's shuffled epochs
        overrides += ["network.name='tutorial'", "train.batching='epochs'", "train.batch_size=10"]
    config = _config(tiny_preset, image_folder, *overrides)
    data = load_images(str(image_folder), None, 8)
    train(config, tmp_path / "straight", data=data, progress=False)
    half = apply_overrides(config, ["train.steps=3"])
    train(half, tmp_path / "resumed", data=data, progress=False)
    result = train(config, tmp_path / "resumed", resume=True, data=data, progress=False)
    assert result.step == 6
    for name in ("net", "ema") if method == "edm" else ("net",):
        a, b = _weights(tmp_path / "straight", name), _weights(tmp_path / "resumed", name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resume"


def test_resume_when_done_only_draws_final_pictures_that_are_missing(
    tmp_path, tiny_preset, image_folder
):
    config = _config(tiny_preset, image_folder)
    data = load_images(str(image_folder), None, 8)
    train(config, tmp_path / "run", data=data, progress=False)
    gif = tmp_path / "run" / "pictures" / "reverse-process.gif"
    drawn = gif.stat().st_mtime_ns
    result = train(config, tmp_path / "run", resume=True, data=data, progress=False)
    assert result.stopped_by == "already-done" and result.step == 6
    assert gif.stat().st_mtime_ns == drawn  # nothing drawn again
    gif.unlink()  # as if a signal stopped the run while it drew its final pictures
    result = train(config, tmp_path / "run", resume=True, data=data, progress=False)
    assert result.stopped_by == "already-done" and gif.is_file()
    # extended, and stopped after its last checkpoint, before its final pictures: the GIF there
    # is the shorter run's (older than the checkpoint) and is drawn again
    longer = _config(tiny_preset, image_folder, "train.steps=8")
    train(longer, tmp_path / "run", resume=True, data=data, progress=False)
    newest = list_checkpoints(tmp_path / "run")[-1]
    os.utime(gif, ns=(drawn, newest.stat().st_mtime_ns - 1))
    result = train(longer, tmp_path / "run", resume=True, data=data, progress=False)
    assert result.stopped_by == "already-done" and result.step == 8
    assert gif.stat().st_mtime_ns > newest.stat().st_mtime_ns


def test_checkpoints_roll_and_snapshots_stay(tmp_path, tiny_preset, image_folder):
    config = _config(
        tiny_preset,
        image_folder,
        "train.steps=8",
        "train.checkpoint_every=1",
        "train.keep_last=2",
        "train.snapshot_every=4",
    )
    train(config, tmp_path / "run", data=load_images(str(image_folder), None, 8), progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["step-00000004", "step-00000007", "step-00000008"]
    # a snapshot between the regular checkpoints is written where it falls
    config = _config(
        tiny_preset,
        image_folder,
        "train.steps=8",
        "train.checkpoint_every=5",
        "train.snapshot_every=3",
    )
    train(config, tmp_path / "odd", data=load_images(str(image_folder), None, 8), progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "odd")]
    assert names == ["step-00000003", "step-00000006", "step-00000008"]


def test_images_limit_and_time_limit(tmp_path, tiny_preset, image_folder):
    data = load_images(str(image_folder), None, 8)
    config = _config(tiny_preset, image_folder, "train.steps=0", "train.images=20")
    result = train(config, tmp_path / "a", data=data, progress=False)
    assert result.stopped_by == "images" and result.images_seen == 24 and result.step == 3
    config = _config(tiny_preset, image_folder, "train.steps=0", "train.time_limit=0.0001")
    result = train(config, tmp_path / "b", data=data, progress=False)
    assert result.stopped_by == "time-limit" and result.step >= 1
    assert list_checkpoints(tmp_path / "b")  # a checkpoint at the end


@pytest.mark.parametrize("method", ["ddpm", "ddpm-cosine", "flow", "edm", "tutorial"])
@pytest.mark.parametrize("network", ["unet", "tutorial", "tutorial-keras"])
def test_every_objective_gives_a_finite_loss_and_gradients(method, network):
    from difflab.config import Config
    from difflab.registry import build_method, build_network

    config = Config()
    config.method.name, config.network.name = method, network
    config.data.image_size = 8
    config.network.unet.channels, config.network.unet.channel_mult = 8, [1, 2]
    config.network.unet.attention_resolutions = []
    net = build_network(config)
    for p in net.parameters():  # the U-Net starts at exactly zero output: perturb it
        if not p.any():
            torch.nn.init.normal_(p, std=0.01)
    method_obj = build_method(config)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = method_obj.objective(method_obj.denoiser(net), x0, torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_preset, image_folder):
    data = load_images(str(image_folder), None, 8)
    common = ["network.unet.dropout=0.0", "train.optimizer='sgd'", "train.lr=0.05", "train.steps=3"]
    runs = {}
    for accumulation in (1, 4):
        config = _config(tiny_preset, image_folder, *common, f"train.accumulation={accumulation}")
        train(config, tmp_path / f"acc{accumulation}", data=data, progress=False)
        runs[accumulation] = _weights(tmp_path / f"acc{accumulation}")
    worst = max((runs[1][k] - runs[4][k]).abs().max().item() for k in runs[1])
    assert worst < 1e-5  # only float summation order differs


def test_channels_last_trains_to_the_same_weights(tmp_path, tiny_preset, image_folder):
    data = load_images(str(image_folder), None, 8)
    common = ["network.unet.dropout=0.0", "train.optimizer='sgd'", "train.lr=0.05", "train.steps=2"]
    for flag in ("false", "true"):
        config = _config(tiny_preset, image_folder, *common, f"train.channels_last={flag}")
        train(config, tmp_path / flag, data=data, progress=False)
    a, b = _weights(tmp_path / "false"), _weights(tmp_path / "true")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_ddpm_paper_is_ho_et_al_exactly():
    """EMA 0.9999 per step at batch 128 from the first step, and the "fixedlarge" sampler."""
    config = load_preset("ddpm-paper")
    t = config.train
    assert t.batch_size == 128 and t.lr == 2e-4 and t.warmup_steps == 5000 and t.grad_clip == 1
    for images_seen in (128, 10**6, 10**8):
        assert ema_beta(128, images_seen, t) == pytest.approx(0.9999, abs=1e-9)
    assert config.sampler.variance == "large" and config.sampler.clip_x0
    assert config.sampler.steps == config.method.ddpm.num_timesteps == 1000


def test_a_constant_rate_run_resumed_into_a_cooldown_is_the_run_planned_so(
    tmp_path, tiny_preset, image_folder, capsys
):
    """Warm-up, stable, decay branched off a finished constant-rate run: 6 steps, then resumed
    to 10 cooling down over the last 4, ends bit-exactly where a run told so from the start ends;
    extending that run again would change rates already used, so it is refused in one line and
    config.json stays as it was."""
    base = ["--preset", tiny_preset, "--data", image_folder, "--no-progress"]
    base += ["--set", "train.sample_every_kimg=0"]
    cool = ["--set", "train.lr_schedule='cooldown'", "--set", "train.cooldown=0.4"]
    straight, branched = tmp_path / "straight", tmp_path / "branched"
    assert run_cli(capsys, "train", *base, "--out", straight, "--steps", 10, *cool)[0] == 0
    assert run_cli(capsys, "train", *base, "--out", branched, "--steps", 6)[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", branched, "--steps", 10, *cool)
    assert code == 0, err
    assert json.loads((branched / "config.json").read_text())["train"]["lr_schedule"] == "cooldown"
    for name in ("net", "ema"):
        a, b = _weights(straight, name), _weights(branched, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ"
    before = (branched / "config.json").read_text()
    code, _, err = run_cli(capsys, "train", "--resume", branched, "--steps", 12, "--no-progress")
    assert (
        code != 0
        and "change the learning rate of a step it has taken (step 7: 0.0015 -> 0.002)" in err
    ), err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert (branched / "config.json").read_text() == before
