"""Export to diffusers: the same network output and the same 4-step DDIM sample in diffusers as
in difflab, for every exportable preset; a one-line refusal for the others."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from difflab.config import apply_overrides, load_preset
from difflab.diffusers_export import EXPORTABLE, check_exportable, unet_config, unet_weights
from difflab.errors import DifflabError
from difflab.registry import build_method, build_network
from difflab.samplers import ddim_sampler

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the dev extra")


def _randomised(preset: str, *overrides: str):
    """The preset's network with every weight random (zero-initialised layers would hide
    mapping errors), its method, and the matching UNet2DModel."""
    config = apply_overrides(load_preset(preset), list(overrides))
    net, method = build_network(config).eval(), build_method(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(scale + 0.05 * torch.randn(p.shape, generator=gen))
    check_exportable(config, net, method.process)
    theirs = diffusers.UNet2DModel.from_config(unet_config(net)).eval()
    theirs.load_state_dict(unet_weights(net), strict=True)
    return config, net, method, theirs


@pytest.mark.parametrize("preset", EXPORTABLE)
def test_unet2dmodel_computes_what_difflab_computes(preset):
    _, net, method, theirs = _randomised(preset, "network.unet.dropout=0.0")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    steps = torch.tensor([1, 437, 1000])  # difflab's step i; diffusers' timestep i - 1
    with torch.no_grad():
        ours = net(x, method.process.noise_condition(steps / 1000))
        out = theirs(x, steps - 1).sample
    assert ours.abs().mean() > 0.05  # a real output, not zeros
    torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-4)


def test_a_conditional_network_exports_with_no_class_as_the_last_index():
    _, net, _, theirs = _randomised("ddpm-paper", "network.unet.num_classes=3")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    steps = torch.tensor([20, 500, 980])
    with torch.no_grad():
        ours = net(x, steps / 1000, torch.tensor([0, 2, -1]))
        out = theirs(x, steps - 1, class_labels=torch.tensor([0, 2, 3])).sample
    torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("preset", "prediction"), [(p, None) for p in EXPORTABLE] + [("ddpm-paper", "x0")]
)
def test_a_4_step_ddim_sample_matches_through_the_diffusers_scheduler(preset, prediction):
    extra = [] if prediction is None else [f"method.ddpm.prediction='{prediction}'"]
    config, net, method, theirs = _randomised(preset, "network.unet.dropout=0.0", *extra)
    from difflab.diffusers_export import scheduler_config

    scheduler = diffusers.DDIMScheduler.from_config(
        scheduler_config(config, method.process.betas(), method.parameterization.name),
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    clip = config.sampler.clip_x0  # the paper presets clip x0 (Ho et al. 2020)
    ours = ddim_sampler(method.denoiser(net), noise, method.process.grid(4), clip_x0=clip)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:  # difflab's eps is the clipped x0's, as this option says
            step = scheduler.step(theirs(x, t).sample, t, x, eta=0.0, use_clipped_model_output=clip)
            x = step.prev_sample
    assert (ours - noise).abs().mean() > 0.05
    torch.testing.assert_close(x, ours, rtol=1e-3, atol=1e-3)


def test_export_writes_a_pipeline_folder_that_diffusers_loads(
    tmp_path, tiny_preset, image_folder, capsys
):
    run_dir = tmp_path / "run"
    ddpm = ["method.name='ddpm'", "network.unet.embedding='positional'", "network.unet.channels=32"]
    ddpm += ["network.unet.attention_resolutions=[4]", "train.sample_every_kimg=0"]
    sets = [arg for s in ddpm for arg in ("--set", s)]
    code, _, err = run_cli(capsys, "train", "--preset", tiny_preset, "--data", image_folder,
                           "--out", run_dir, "--no-progress", "--steps", 2, *sets)  # fmt: skip
    assert code == 0, err
    out = tmp_path / "export"
    code, printed, err = run_cli(capsys, "export", run_dir, "--format", "diffusers", "--out", out)
    assert code == 0, err
    assert "DDPMPipeline.from_pretrained" in printed
    pipeline = diffusers.DDPMPipeline.from_pretrained(str(out))
    card = (out / "README.md").read_text()
    assert "ddpm" in card and "2 optimizer steps" in card
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o044
    from difflab.api import load_run

    run = load_run(run_dir, device="cpu")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = run.net(x, torch.tensor([0.5, 0.9]))
        out_theirs = pipeline.unet(x, torch.tensor([499, 899])).sample
    torch.testing.assert_close(out_theirs, ours, rtol=1e-4, atol=1e-5)
    betas = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["trained_betas"]
    torch.testing.assert_close(pipeline.scheduler.betas.double(), run.method.process.betas())
    assert len(betas) == 1000
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(
        capsys, "export", run_dir, "--format", "diffusers", "--out", tmp_path / "mine"
    )
    assert code != 0 and "other files" in err and (tmp_path / "mine" / "notes.txt").exists()
    code, _, err = run_cli(capsys, "export", run_dir, "--format", "diffusers", "--out", out)
    assert code == 0, err  # an earlier export is replaced


def test_a_conditional_export_samples_each_class_by_its_model_cards_code(
    tmp_path, tiny_preset, image_folder, capsys
):
    run_dir, out = tmp_path / "run", tmp_path / "export"
    ddpm = ["method.name='ddpm'", "network.unet.embedding='positional'", "data.conditional=true"]
    ddpm += ["network.unet.channels=32"]
    sets = [arg for s in [*ddpm, "train.sample_every_kimg=0"] for arg in ("--set", s)]
    code, _, err = run_cli(capsys, "train", "--preset", tiny_preset, "--data", image_folder,
                           "--out", run_dir, "--no-progress", "--steps", 2, *sets)  # fmt: skip
    assert code == 0, err
    code, printed, err = run_cli(capsys, "export", run_dir, "--format", "diffusers", "--out", out)
    assert code == 0 and "class_labels" in printed, err
    card = (out / "README.md").read_text()
    assert "| 0 | cars |" in card and "| 1 | ships |" in card and "| 2 | no class |" in card
    assert "unconditional-image-generation" not in card
    code_block = card.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(code_block.replace("PATH/TO/THIS/FOLDER", str(out)).replace("(1000)", "(20)"), namespace)
    images = namespace["images"]
    assert images.shape == (16, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0


@pytest.mark.parametrize("preset", ["flow-cpu", "edm-paper", "ddpm-cpu", "tutorial"])
def test_presets_that_do_not_map_are_refused_in_one_line(preset):
    config = load_preset(preset)
    with pytest.raises(DifflabError) as error:
        check_exportable(config, build_network(config), build_method(config).process)
    message = str(error.value)
    assert "\n" not in message and "runs of ddpm-paper and ddpm-cosine-paper export" in message


def test_exporting_a_run_that_does_not_map_is_one_line(tmp_path, tiny_preset, image_folder, capsys):
    """Through the command line too: the check comes before the model card reads DDPM's
    settings (an EDM run ended in "unexpected KeyError: 'edm'")."""
    run_dir = tmp_path / "edm"
    code, _, err = run_cli(capsys, "train", "--preset", tiny_preset, "--data", image_folder,
                           "--out", run_dir, "--no-progress", "--steps", 1)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "export", run_dir, "--format", "diffusers", "--out", tmp_path / "x"
    )
    assert code == 2 and "cannot be exported to diffusers" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists(), err
