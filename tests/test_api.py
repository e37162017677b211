"""The Python API as a user of diffusers or NVlabs/edm would drive it: train from code, sample on
the weights' device, own networks, steps as they happen, export, and one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import difflab
from difflab.config import SamplerConfig, apply_overrides, load_preset
from difflab.errors import DifflabError
from difflab.plans import build_sampler
from difflab.registry import build_method


def test_training_from_code_checks_the_config_first_and_stores_absolute_paths(
    tmp_path, tiny_preset, image_folder, monkeypatch
):
    from difflab.train import TrainResult, train

    monkeypatch.chdir(image_folder.parent)
    config = apply_overrides(
        load_preset(tiny_preset),
        [f'data.source="{image_folder.name}"', "train.steps=2", 'train.eval_ref="ref.npz"'],
    )
    bad = dataclasses.replace(config, train=dataclasses.replace(config.train, lr="0.001"))
    with pytest.raises(DifflabError, match=r"train\.lr: expected a number"):
        train(bad, tmp_path / "bad")
    with pytest.raises(DifflabError, match="config must be a difflab Config"):
        train(config.to_dict(), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything was made
    result = train(config, tmp_path / "run", progress=False)
    assert isinstance(result, TrainResult) and result.step == 2
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["data"]["source"] == str(image_folder.resolve())  # resumable from anywhere
    assert stored["train"]["eval_ref"] == str((image_folder.parent / "ref.npz").resolve())


def test_a_run_samples_where_its_weights_are_and_says_what_it_is(teacher):
    run = difflab.load_run(teacher, device="cpu")
    assert run.device == torch.device("cpu") and run.to("cpu") is run
    other = difflab.load_run(teacher)
    other.net.to("meta")
    assert other.device == torch.device("meta")  # the weights', wherever they went
    text = repr(run)
    assert len(text) < 300 and "method='edm'" in text and "step=4" in text
    assert {"heun", "euler", "edm", "edm-stochastic"} <= set(run.samplers)
    assert "ddim" not in run.samplers  # a VP sampler: not for EDM
    assert run.denoiser(torch.zeros(1, *run.image_shape), 1.0).x0.shape == (1, *run.image_shape)
    generated = run.generate(2, record=True)
    assert "tensor" not in repr(generated) and generated.images.dtype == torch.float32


def test_sampling_is_in_eval_mode_and_on_step_sees_every_state(teacher):
    run = difflab.load_run(teacher, device="cpu")
    reference = run.sample(3, seed=1, steps=3)
    run.net.train()  # the tiny preset's dropout would change the samples in training mode
    seen = []
    again = run.sample(3, seed=1, steps=3, on_step=lambda i, x, x0: seen.append((i, x0.shape)))
    assert torch.equal(again, reference) and run.net.training  # its mode given back
    frozen = next(m for m in run.net.modules() if m is not run.net)
    frozen.eval()  # a part kept in eval on purpose stays so
    run.sample(1, steps=3)
    assert run.net.training and not frozen.training
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == (3, *run.image_shape)


def test_export_from_code_loads_back_to_the_same_samples(teacher, tmp_path):
    run = difflab.load_run(teacher)
    path = run.export(tmp_path / "model.safetensors")
    assert torch.equal(difflab.load_run(path).sample(2), run.sample(2))
    with pytest.raises(DifflabError, match=r"must end in \.safetensors"):
        run.export(tmp_path / "model.pt")
    with pytest.raises(DifflabError, match=r"config\.json"):
        run.export(teacher / "config.json")  # a run's own file
    guided = difflab.load_run(teacher, guide=teacher / "checkpoints" / "step-00000003")
    with pytest.raises(DifflabError, match="only a run's own guide"):
        guided.export(tmp_path / "guided.safetensors")  # its config would not say so


@pytest.mark.parametrize(
    "option, message",
    [
        ({"n": 4}, "the number of images is num"),
        ({"num_steps": 3}, r"did you mean steps=\?"),
        ({"labels": [0]}, "the class is label="),
        ({"device": "cpu"}, "run.to"),
        ({"record": True}, "generate"),
        ({"guidence": 2.0}, r"did you mean guidance=\?"),
        ({"progress": "yes"}, "progress must be True or False"),
    ],
)
def test_a_misnamed_or_mistyped_sample_option_is_one_line_that_says_what_to_use(
    teacher, option, message
):
    run = difflab.load_run(teacher)
    with pytest.raises(DifflabError, match=message):
        run.sample(2, **option)


class OwnNet(nn.Module):
    """A user's network with the unconditional signature forward(x, noise_condition)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * cond.reshape(-1, 1, 1, 1).tanh()


def test_difflabs_samplers_drive_a_users_own_network(tiny_preset):
    method = build_method(load_preset(tiny_preset))
    denoiser = method.denoiser(OwnNet())
    noise = torch.randn(2, 3, 8, 8) * 80
    ode = build_sampler(method, SamplerConfig(name="heun", steps=3))
    assert ode(denoiser, noise).shape == noise.shape
    stochastic = build_sampler(method, SamplerConfig(name="edm-stochastic", steps=3, s_churn=40))
    with pytest.raises(DifflabError, match="draws fresh noise as it goes"):
        stochastic(denoiser, noise)
    with pytest.raises(DifflabError, match="one seed per image"):
        stochastic(denoiser, noise, torch.Generator())
    first, second = stochastic(denoiser, noise, [1, 2]), stochastic(denoiser, noise, [1, 2])
    assert torch.equal(first, second)  # one seed per image: the same images
    assert torch.equal(stochastic(denoiser, noise, torch.tensor([1, 2])), first)
    with pytest.raises(DifflabError, match="one seed per image"):
        stochastic(denoiser, noise, "ab")


def test_a_preset_is_a_name_or_a_path(tiny_preset):
    assert load_preset(tiny_preset) == load_preset(str(tiny_preset))  # a pathlib.Path too
    with pytest.raises(DifflabError, match=r"a preset is a name or a \.toml path"):
        load_preset(3)


@pytest.mark.parametrize("nrow", ["2", 0, True, 1.5])
def test_a_grids_row_length_is_a_positive_integer(tmp_path, nrow):
    with pytest.raises(DifflabError, match="nrow must be a positive integer"):
        difflab.save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "g.png", nrow=nrow)
