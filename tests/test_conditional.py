"""Classes and classifier-free guidance (issue 15).

Guidance is checked on the exact denoiser of a two-class Gaussian mixture: x0 | c ~ N(mu_c,
s^2) per pixel with mu = -M, +M and equal priors. With the flow path x_t = (1 - t) x0 + t eps,
the conditional denoiser is mu_c + g (x_t - alpha mu_c), g = alpha s^2 / (alpha^2 s^2 + t^2),
and the unconditional one weighs the two by p(c | x_t). Closed forms: w = 1 gives N(mu_c, s^2),
w = 0 the mixture whatever the label. For w > 1 the output has no closed form, so the reference
is the probability-flow ODE of the guided denoiser integrated independently (NumPy, float64,
RK4 with 4,000 steps) from the same starting noise.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from difflab.api import load_run
from difflab.config import MethodConfig, SamplerConfig, load_json
from difflab.denoisers import Denoiser, times_like
from difflab.plans import build_sampler
from difflab.registry import METHODS
from difflab.samplers import SampleNoise
from difflab.seeds import image_seeds

M, S = 1.5, 0.4
SHAPE = (1, 4, 4)


class ExactMixture(Denoiser):
    """The exact denoiser of the two-class mixture on the flow path; label -1 is p(x)."""

    def __init__(self) -> None:
        method = METHODS["flow"](MethodConfig(name="flow"))
        super().__init__(torch.nn.Identity(), method.process, method.parameterization)

    def raw(self, x, t, labels=None):
        t = times_like(t, x).double()
        c = self.coefficients(t, x.ndim)
        x = x.double()
        x0 = torch.as_tensor(mixture_x0(x.numpy(), t.numpy()[:, None, None, None], labels))
        eps = (x - c.alpha.double() * x0) / c.sigma.double()
        return self.parameterization.target(x0, eps, c).float()


def mixture_x0(x: np.ndarray, t: np.ndarray | float, labels) -> np.ndarray:
    """E[x0 | x_t, c] (c = 0, 1) or E[x0 | x_t] (c = -1), in NumPy float64."""
    alpha, var = 1 - t, (1 - t) ** 2 * S**2 + t**2
    g = alpha * S**2 / var
    means = [-M, M]
    cond = [mu + g * (x - alpha * mu) for mu in means]
    logits = [-((x - alpha * mu) ** 2) / (2 * var) for mu in means]
    p_plus = 1 / (1 + np.exp(logits[0] - logits[1]))
    uncond = (1 - p_plus) * cond[0] + p_plus * cond[1]
    label = np.asarray(labels if labels is not None else -1).reshape(-1, *[1] * (x.ndim - 1))
    return np.where(label == 1, cond[1], np.where(label == 0, cond[0], uncond))


def reference_ode(x: np.ndarray, labels: np.ndarray, w: float, steps: int = 4000) -> np.ndarray:
    """dx/dt = (x - D_w(x, t)) / t from t = 1 to 0 with RK4 (the flow path's velocity)."""

    def velocity(x, t):
        guided = mixture_x0(x, t, -1) + w * (mixture_x0(x, t, labels) - mixture_x0(x, t, -1))
        return (x - guided) / t

    ts = np.linspace(1.0, 1e-6, steps + 1)
    for t, t_next in itertools.pairwise(ts):
        h = t_next - t
        k1 = velocity(x, t)
        k2 = velocity(x + h / 2 * k1, t + h / 2)
        k3 = velocity(x + h / 2 * k2, t + h / 2)
        k4 = velocity(x + h * k3, t_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return mixture_x0(x, ts[-1], -1) + w * (
        mixture_x0(x, ts[-1], labels) - mixture_x0(x, ts[-1], -1)
    )


def guided_samples(
    labels: torch.Tensor, w: float, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    method = METHODS["flow"](MethodConfig(name="flow"))
    plan = build_sampler(method, SamplerConfig(name="heun", steps=steps))
    rng = SampleNoise(image_seeds(0, 0, len(labels)))
    noise = rng.randn(SHAPE)
    return plan(ExactMixture().bind(labels, w), noise, rng), noise


@pytest.mark.parametrize("label", [0, 1])
def test_guidance_one_gives_the_class_and_zero_the_mixture(label):
    labels = torch.full((400,), label)
    x, _ = guided_samples(labels, 1.0)
    assert x.mean().item() == pytest.approx([-M, M][label], abs=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.03)
    x, _ = guided_samples(labels, 0.0)  # unconditional whatever the label
    positive = (x > 0).float().mean().item()
    assert positive == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / x.numel()))
    assert x.mean().item() == pytest.approx(0.0, abs=0.06)
    assert x.var().item() == pytest.approx(S**2 + M**2, rel=0.05)


def test_guidance_above_one_follows_the_guided_ode():
    labels = torch.tensor([0, 1] * 16)
    x, noise = guided_samples(labels, 3.0)
    reference = reference_ode(noise.double().numpy(), labels.numpy(), 3.0)
    assert np.abs(x.double().numpy() - reference).max() < 2e-3
    # Guidance pushes each class beyond its own mean: further out, narrower than at w = 1.
    plus = x[labels == 1]
    assert plus.mean().item() > M and plus.std().item() < S


def test_guided_sampling_is_per_image_whatever_the_batch_and_its_other_labels():
    from difflab.models import UNet, UNetConfig

    torch.manual_seed(0)
    options = {"channel_mult": (1, 2), "attention_resolutions": (4,), "num_classes": 3}
    net = UNet(3, 8, UNetConfig(channels=8, num_blocks=1, **options))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    method = METHODS["edm"](MethodConfig(name="edm"))
    denoiser, plan = method.denoiser(net.eval()), build_sampler(method, SamplerConfig(steps=4))
    seeds = image_seeds(5, 0, 4)

    def run(chunk, labels):
        rng = SampleNoise(chunk)
        return plan(denoiser.bind(torch.tensor(labels), 2.5), rng.randn((3, 8, 8)) * 80, rng)

    whole = run(seeds, [2, 0, 1, 2])
    alone = run(seeds[3:], [2])
    mixed = run(seeds[2:], [0, 2])
    assert torch.allclose(whole[3:], alone, atol=1e-5)
    assert torch.allclose(whole[3:], mixed[1:], atol=1e-5)
    assert not torch.allclose(run(seeds[3:], [1]), alone, atol=1e-3)  # the label matters


def test_label_dropout_replaces_the_expected_share_with_no_class(tmp_path):
    import tomllib
    from conftest import TINY_PRESET

    from difflab.config import apply_overrides, from_dict
    from difflab.data import ImageSet
    from difflab.train.trainer import Trainer

    config = apply_overrides(
        from_dict(tomllib.loads(TINY_PRESET)),
        ["data.conditional=true", "train.label_dropout=0.25", "train.batch_size=4000"],
    )
    images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)
    data = ImageSet(images, torch.arange(40) % 2, ["a", "b"], "two classes")
    with Trainer(config, tmp_path / "run", data=data) as trainer:
        assert trainer.conditional and trainer.net.num_classes == 2
        index = torch.randint(40, (4000,))
        generator = torch.Generator().manual_seed(1)
        dropped = trainer._dropped_labels(index, generator)
    share = (dropped == -1).float().mean().item()
    assert share == pytest.approx(0.25, abs=4 * math.sqrt(0.25 * 0.75 / 4000))
    kept = dropped != -1
    assert torch.equal(dropped[kept], (index % 2)[kept])


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def conditional_run(tmp_path, tiny_preset, image_folder, capsys):
    run_dir = tmp_path / "cond"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    args += ["--steps", 4, "--no-progress", "--set", "data.conditional=true"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    return run_dir


def test_a_conditional_run_learns_the_classes_of_its_folder(conditional_run):
    config = load_json(conditional_run / "config.json")
    assert config.data.class_names == ["cars", "ships"]
    assert config.network.unet.num_classes == 2
    with Image.open(conditional_run / "pictures" / "samples-latest.png") as grid:
        assert grid.size == (2 + 2 * 10, 2 + 2 * 10)  # 4 previews: one row of 2 per class


def test_sample_a_label_or_all_with_guidance(conditional_run, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "sample", conditional_run, "--label", "ships", "--guidance", 2, "--num", 3,
        "--out", tmp_path / "ships",
    )  # fmt: skip
    assert code == 0 and "label ships, guidance 2" in out, err
    code, out, err = run_cli(
        capsys, "sample", conditional_run, "--label", "all", "--num", 6, "--out", tmp_path / "all",
        "--gif",
    )  # fmt: skip
    assert code == 0, err
    with Image.open(tmp_path / "all" / "grid.png") as grid:
        assert grid.size == (2 + 3 * 10, 2 + 2 * 10)  # one row of 3 per class
    run = load_run(conditional_run, device="cpu")
    one = run.sample(2, label=1, guidance=2.0)
    assert torch.equal(one, run.sample(2, label="ships", guidance=2.0))
    assert not torch.equal(one, run.sample(2, label="cars", guidance=2.0))
    exported = tmp_path / "cond.safetensors"
    assert run_cli(capsys, "export", conditional_run, "--out", exported)[0] == 0
    assert load_run(exported, device="cpu").class_names == ["cars", "ships"]


def test_one_class_of_a_conditional_preset_trains_unconditionally(
    tmp_path, tiny_preset, image_folder, capsys
):
    run_dir = tmp_path / "cars"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    args += ["--class", "cars", "--steps", 2, "--no-progress", "--set", "data.conditional=true"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "training unconditionally" in err, err
    config = load_json(run_dir / "config.json")
    assert config.data.class_names == [] and config.network.unet.num_classes == 0


def test_resuming_with_other_classes_is_refused(conditional_run, tmp_path, capsys):
    from conftest import make_images

    other = make_images(tmp_path / "other", 4, classes=("cats", "dogs", "frogs"))
    code, _, err = run_cli(
        capsys, "train", "--resume", conditional_run, "--steps", 6, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((conditional_run / "config.json").read_text())
    config["data"]["source"] = str(other)
    (conditional_run / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "train", "--resume", conditional_run, "--steps", 8)
    assert code == 2 and "learned the classes 0=cars, 1=ships" in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "horse"], "unknown label 'horse'; this run's classes: 0=cars, 1=ships"),
        (["--label", "7"], "unknown label 7"),
        (["--label", "all", "--num", 3], "a multiple of 2"),
        (
            ["--guidance", "-1", "--label", "cars"],
            "argument --guidance: must be a number in [0, 100]",
        ),
        (["--guidance", "strong", "--label", "cars"], "argument --guidance"),
        (["--guidance", "2"], "guidance needs a label"),
    ],
)
def test_bad_labels_and_guidance_are_one_line(conditional_run, tmp_path, capsys, extra, message):
    code, _, err = run_cli(capsys, "sample", conditional_run, "--out", tmp_path / "s", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_label_on_an_unconditional_run_is_one_line(tmp_path, tiny_preset, image_folder, capsys):
    run_dir = tmp_path / "plain"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    assert run_cli(capsys, *args, "--steps", 2, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "sample", run_dir, "--label", "cars", "--out", tmp_path / "s")
    assert code == 2 and "this run is unconditional" in err, err


def test_a_config_of_version_one_is_upgraded(conditional_run):
    """Runs written before the per-method sections load unchanged."""
    original = load_json(conditional_run / "config.json")
    values = json.loads((conditional_run / "config.json").read_text())
    method = values["method"]
    flat = {"name": method["name"], "stratified": method["stratified"]}
    for section in ("tutorial", "ddpm", "flow", "edm"):
        flat.update(method[section])
    flat.update(method["edm"])  # one p_mean / p_std in version 1: the chosen method's
    version_one = {**values, "method": flat, "version": 1}
    (conditional_run / "config.json").write_text(json.dumps(version_one))
    assert load_json(conditional_run / "config.json") == original
    assert load_run(conditional_run, device="cpu").step == 4
