"""Autoguidance (Karras et al. 2024): a model guided away from a weaker version of itself, here
the run's own EMA weights at ``sampler.guide_at`` of its training, kept by the trainer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from torch import nn

from difflab.api import load_run
from difflab.config import MethodConfig
from difflab.denoisers import Denoiser
from difflab.registry import METHODS
from difflab.schema import AUTOGUIDANCE
from difflab.train.checkpoint import list_checkpoints


class Constant(nn.Module):
    """A network whose output is ``value`` everywhere; counts its calls."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value, self.calls = value, 0

    def forward(self, x, cond, labels=None):
        self.calls += 1
        return torch.full_like(x, self.value)


def _denoiser(value: float) -> Denoiser:
    method = METHODS["flow"](MethodConfig(name="flow"))
    return Denoiser(Constant(value), method.process, method.parameterization)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guidance_extrapolates_from_the_guide_through_the_model(w):
    """out = guide + w (model - guide): w = 0 is the guide, 1 the model alone (the guide is not
    evaluated), above 1 past the model, away from the guide."""
    model, guide = _denoiser(3.0), _denoiser(1.0)
    x = torch.randn(2, 3, 4, 4)
    out = model.bind(None, w, guide).raw(x, 0.5)
    assert torch.allclose(out, torch.full_like(x, 1.0 + w * 2.0))
    assert guide.net.calls == (0 if w == 1.0 else 1)


GUIDED = ["--set", "sampler.guide_at=0.25", "--set", "sampler.guidance=2"]


@pytest.fixture
def guided_run(tmp_path, tiny_preset, image_folder, capsys):
    """8 steps with the guide at step 2, checkpoints every step, all kept; previews on."""
    run_dir = tmp_path / "run"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    args += ["--steps", 8, "--no-progress", *GUIDED]
    args += ["--set", "train.checkpoint_every=1", "--set", "train.keep_last=20"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    return run_dir


def test_the_trainer_keeps_the_guide_and_sampling_uses_it(
    tmp_path, tiny_preset, image_folder, capsys
):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    code, _, err = run_cli(capsys, *args, "--steps", 8, "--no-progress", *GUIDED)
    assert code == 0, err
    # checkpoint_every 3 and keep_last 2 would keep 6 and 8; the guide's step 2 stays too
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["step-00000002", "step-00000006", "step-00000008"]
    run = load_run(run_dir)
    guide = load_file(str(run_dir / "checkpoints" / "step-00000002" / "ema.safetensors"))
    assert all(torch.equal(v, guide[k]) for k, v in run.guide.state_dict().items())
    made = {}
    for weight in ("2", "1"):
        out = tmp_path / f"w{weight}"
        code, _, err = run_cli(capsys, "sample", run_dir, "--num", 2, "--out", out,
                                  "--guidance", weight)  # fmt: skip
        assert code == 0, err
        made[weight] = json.loads((out / "samples.json").read_text())
    # Heun in 4 steps: 7 evaluations per image, twice that with the guide
    assert made["1"]["evaluations"] == 7 and made["2"]["evaluations"] == 14
    assert made["2"]["guidance"] == 2
    a, b = (run.sample(2, guidance=w) for w in (2.0, 1.0))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("resume_from", [1, 3], ids=["before-the-guide", "after-it"])
def test_resume_keeps_the_guide_and_is_bit_exact(guided_run, tmp_path, capsys, resume_from):
    resumed = tmp_path / "resumed"
    shutil.copytree(guided_run, resumed)
    for path in list_checkpoints(resumed):
        if int(path.name.split("-")[1]) > resume_from:
            shutil.rmtree(path)
    code, _, err = run_cli(capsys, "train", "--resume", resumed, "--no-progress")
    assert code == 0, err
    for step, name in [(2, "ema"), (8, "net"), (8, "ema")]:
        folder = f"checkpoints/step-{step:08d}/{name}.safetensors"
        a, b = load_file(str(guided_run / folder)), load_file(str(resumed / folder))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{folder} differs after resume"


def test_an_explicit_guide_and_a_wrong_one(guided_run, tmp_path, tiny_preset, image_folder, capsys):
    early = guided_run / "checkpoints" / "step-00000001"
    run = load_run(guided_run, guide=early)
    weights = load_file(str(early / "ema.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in run.guide.state_dict().items())
    other = tmp_path / "flow"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", other]
    assert run_cli(capsys, *args, "--steps", 1, "--set", "method.name='flow'")[0] == 0
    code, _, err = run_cli(capsys, "sample", guided_run, "--guide", other, "--out", tmp_path / "s")
    assert code == 2 and "autoguidance needs" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(
        capsys, "sample", guided_run, "--guide", tmp_path / "none", "--out", tmp_path / "s"
    )
    assert code == 2 and "the guide: run directory" in err and len(err.strip().splitlines()) == 1, (
        err
    )


def test_guidance_without_a_label_or_a_guide_is_one_line(
    tmp_path, tiny_preset, image_folder, capsys
):
    run_dir = tmp_path / "plain"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    assert run_cli(capsys, *args, "--steps", 2, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "sample", run_dir, "--guidance", 2, "--out", tmp_path / "s")
    assert code == 2 and "or a guide" in err and len(err.strip().splitlines()) == 1, err


def test_a_named_guide_is_never_a_no_op(tmp_path, tiny_preset, image_folder, capsys):
    """A guide named for a run whose own weight is 1 guides at AUTOGUIDANCE (w = 2): in
    ``sample --guide``, ``load_run(guide=)`` and ``distill --guide`` alike."""
    plain, weak = tmp_path / "plain", tmp_path / "weak"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--no-progress"]
    for run_dir, steps in ((plain, 3), (weak, 1)):
        assert run_cli(capsys, *args, "--out", run_dir, "--steps", steps)[0] == 0
    out = tmp_path / "s"
    code, _, err = run_cli(capsys, "sample", plain, "--guide", weak, "--num", 2, "--out", out)
    assert code == 0, err
    assert json.loads((out / "samples.json").read_text())["guidance"] == AUTOGUIDANCE == 2
    run = load_run(plain, guide=weak)
    assert torch.equal(run.sample(2), run.sample(2, guidance=2.0))
    assert not torch.equal(run.sample(2), run.sample(2, guidance=1.0))
    student = tmp_path / "student"
    code, _, err = run_cli(capsys, "distill", plain, "--guide", weak, "--out", student,
                           "--steps", 1, "--no-progress")  # fmt: skip
    assert code == 0, err
    assert load_run(student).config.method.consistency.teacher_guidance == AUTOGUIDANCE


def test_an_extended_run_keeps_guiding_by_the_guide_it_has(
    tmp_path, tiny_preset, image_folder, capsys
):
    """Extended from 8 to 16 steps, the run's new guide step (4) lies in its past: the guide of
    step 2 stays (pruning skips it) and still guides."""
    run_dir = tmp_path / "run"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    assert run_cli(capsys, *args, "--steps", 8, "--no-progress", *GUIDED)[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", run_dir, "--steps", 16, "--no-progress")
    assert code == 0, err
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["step-00000002", "step-00000015", "step-00000016"], names
    run = load_run(run_dir)
    guide = load_file(str(run_dir / "checkpoints" / "step-00000002" / "ema.safetensors"))
    assert all(torch.equal(v, guide[k]) for k, v in run.guide.state_dict().items())


def test_an_export_carries_the_guide_and_samples_like_the_run(guided_run, tmp_path, capsys):
    out = tmp_path / "cars.safetensors"
    assert run_cli(capsys, "export", guided_run, "--out", out)[0] == 0
    exported, run = load_run(out), load_run(guided_run)
    assert exported.guide is not None
    assert torch.equal(exported.sample(2, seed=3), run.sample(2, seed=3))
    # an export named as its own guide means the guide it carries, not itself
    named = load_run(out, guide=out)
    assert torch.equal(named.sample(2, seed=3), run.sample(2, seed=3))
    code, _, err = run_cli(capsys, "export", guided_run, "--format", "diffusers",
                           "--out", tmp_path / "pipe")  # fmt: skip
    # an EDM run does not map onto DDPMPipeline: a one-line refusal (the guide's warning comes
    # only after an export that happened)
    assert code == 2 and "samples without difflab's autoguidance" not in err, err
    assert "cannot be exported to diffusers" in err and "unexpected" not in err, err
