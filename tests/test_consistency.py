"""Consistency models (issue 16): the parameterization, the objective, distillation runs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_samplers import MU, STD, ExactDenoiser

from difflab.api import load_run
from difflab.config import ConsistencyMethod, MethodConfig
from difflab.denoisers import Coefficients, ConsistencyParameterization
from difflab.objectives import ConsistencyDraw, ConsistencyObjective
from difflab.registry import METHODS
from difflab.schedules import consistency_levels, consistency_sigmas
from difflab.train.checkpoint import list_checkpoints


def test_the_boundary_condition_holds_exactly_whatever_the_network_says():
    """f(x, sigma_min) = x (Song et al. 2023, eq. 5): c_skip = 1 and c_out = 0 there."""
    param = ConsistencyParameterization(sigma_data=0.5, sigma_min=0.002)
    x, out = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 100
    at_min = Coefficients(torch.ones(4, 1, 1, 1), torch.full((4, 1, 1, 1), 0.002))
    assert torch.equal(param.to_x0_eps(out, x, at_min).x0, x)
    high = Coefficients(torch.ones(4, 1, 1, 1), torch.full((4, 1, 1, 1), 80.0))
    c_skip, c_out, _ = param._scales(high)
    assert c_skip.max() < 1e-4 and c_out.min() == pytest.approx(0.5, rel=1e-3)


def test_the_curriculum_doubles_the_levels_every_period_up_to_its_cap():
    """N(k) = min(s0 * 2^floor(k / K'), s1) + 1 (Song & Dhariwal 2023, eq. 8), k in images."""
    levels = [consistency_levels(k * 1000, 10, 1280, 8.0) for k in (0, 7, 8, 16, 50, 10**6)]
    assert levels == [11, 11, 21, 41, 641, 1281]
    sigmas = consistency_sigmas(11, 0.002, 80.0, 7.0)
    assert sigmas[0] == pytest.approx(0.002) and sigmas[-1] == pytest.approx(80.0)
    assert (sigmas.diff() > 0).all()


def test_levels_are_drawn_log_normally_between_neighbours():
    objective = ConsistencyObjective(start_levels=20, max_levels=20)
    draw = objective.draw(20_000, (1, 1, 1), torch.Generator().manual_seed(0), "cpu")
    sigmas = consistency_sigmas(21, 0.002, 80.0, 7.0).float()
    index = torch.searchsorted(sigmas, draw.t_low)
    assert torch.allclose(sigmas[index + 1], draw.t) and (draw.t > draw.t_low).all()
    # Half the draws sit below exp(p_mean), as the log-normal puts them (within sampling noise).
    below = (draw.t_low < math.exp(-1.1)).float().mean().item()
    assert 0.35 < below < 0.65


def test_the_teachers_ode_step_is_right_for_a_flow_teacher():
    """Distillation steps the teacher's ODE in EDM's variables, whatever its own process: on
    the exact Gaussian flow denoiser a Heun step matches the exact flow map closely."""
    flow = METHODS["flow"](MethodConfig(name="flow"))
    objective = ConsistencyObjective(teacher=lambda device: ExactDenoiser(flow))
    objective.prepare(torch.device("cpu"))
    high, low = torch.full((9,), 2.0), torch.full((9,), 1.6)
    y = torch.linspace(-6.0, 6.0, 9).reshape(9, 1, 1, 1)
    stepped = objective._step_back(y, ConsistencyDraw(high, torch.zeros_like(y), low), None)
    exact = MU + (y - MU) * (1.6**2 + STD**2) ** 0.5 / (2.0**2 + STD**2) ** 0.5
    assert (stepped - exact).abs().max() < 2e-3


# --------------------------------------------------------------------------- runs


@pytest.fixture
def teacher(tmp_path, tiny_preset, image_folder, capsys):
    run_dir = tmp_path / "teacher"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--out", run_dir]
    assert run_cli(capsys, *args, "--steps", 4, "--no-progress")[0] == 0
    return run_dir


def _distill(capsys, teacher, out, *extra):
    code, _, err = run_cli(capsys, "distill", teacher, "--out", out, "--no-progress", *extra)
    assert code == 0, err


def test_a_tiny_distillation_lowers_the_consistency_loss(teacher, tmp_path, capsys):
    from difflab.config import load_json
    from difflab.data import load_images
    from difflab.registry import build_method
    from difflab.train.trainer import Trainer

    fixed = [
        "--set",
        "method.consistency.start_levels=8",
        "--set",
        "method.consistency.max_levels=8",
    ]
    fixed += ["--set", "train.ema_halflife_kimg=0", "--set", "train.lr=1e-3"]
    _distill(capsys, teacher, tmp_path / "student", "--steps", 1, *fixed)
    config = load_json(tmp_path / "student" / "config.json")
    data = load_images(str(teacher.parent / "images"), None, 8)
    method = build_method(config)
    method.objective.prepare(torch.device("cpu"))
    draw = method.objective.draw(24, (3, 8, 8), torch.Generator().manual_seed(5), "cpu")
    x0 = data.images[:24].float() / 127.5 - 1

    def loss(net) -> float:
        with torch.no_grad():
            return method.objective.loss(method.denoiser(net), x0, draw).mean().item()

    with Trainer(config, tmp_path / "long", data=data, init=teacher) as trainer:
        before = loss(trainer.net)
        for _ in range(40):
            trainer.train_step()
        trainer.read_back()
        after = loss(trainer.net)
    assert after < 0.8 * before, (before, after)


def test_a_student_samples_in_one_or_two_steps_deterministically(teacher, tmp_path, capsys):
    _distill(capsys, teacher, tmp_path / "student", "--steps", 3)
    run = load_run(tmp_path / "student", device="cpu")
    assert run.plan().name == "consistency" and run.plan().num_steps == 1
    one = run.generate(5, seed=3)
    assert one.evaluations == 1
    assert torch.equal(one.images, run.sample(5, seed=3))
    assert torch.allclose(one.images[2:3], run.sample(1, seed=3, start=2), atol=1e-6)
    two = run.sample(5, seed=3, steps=2)
    assert torch.equal(two, run.sample(5, seed=3, steps=2)) and not torch.equal(two, one.images)
    code, out, err = run_cli(capsys, "sample", tmp_path / "student", "--num", 2, "--steps", 4,
                             "--out", tmp_path / "s")  # fmt: skip
    assert code == 0 and "4 network evaluations per image" in out, err


def test_resuming_a_distillation_is_bit_exact(teacher, tmp_path, capsys):
    _distill(capsys, teacher, tmp_path / "straight", "--steps", 6)
    _distill(capsys, teacher, tmp_path / "halves", "--steps", 3)
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "halves", "--steps", 6)
    assert code == 0, err
    ours, theirs = (
        load_file(str(list_checkpoints(tmp_path / name)[-1] / "net.safetensors"))
        for name in ("straight", "halves")
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bad_distillation_input_is_one_line(teacher, tmp_path, capsys):
    _distill(capsys, teacher, tmp_path / "student", "--steps", 2)
    code, _, err = run_cli(capsys, "distill", tmp_path / "student", "--out", tmp_path / "x",
                           "--steps", 2)  # fmt: skip
    assert code == 2 and "is a consistency model already" in err, err
    code, _, err = run_cli(capsys, "distill", teacher, "--out", tmp_path / "y")
    assert code == 2 and "set a training length" in err, err
    code, _, err = run_cli(capsys, "sample", tmp_path / "student", "--sampler", "heun",
                           "--out", tmp_path / "z")  # fmt: skip
    assert code == 2 and "needs a flow or EDM model" in err, err
    assert ConsistencyMethod().teacher == ""  # consistency training unless a teacher is given


def test_a_teacher_whose_weights_do_not_carry_over_is_named(tiny_preset, image_folder, tmp_path,
                                                             capsys):  # fmt: skip
    """Only an EDM network sees the consistency function's input scalings: distilling a flow run
    from its weights works but says that they are a weak start (methods.md 2.8)."""
    flow = tmp_path / "flow"
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--method", "flow"]
    assert run_cli(capsys, *args, "--out", flow, "--steps", 2, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "distill", flow, "--out", tmp_path / "s", "--steps", 1,
                           "--no-progress")  # fmt: skip
    assert code == 0 and "is a flow run" in err and "weak start" in err, err
    code, _, err = run_cli(capsys, "distill", flow, "--out", tmp_path / "t", "--steps", 1,
                           "--no-progress", "--from-scratch")  # fmt: skip
    assert code == 0 and "weak start" not in err, err


def test_the_target_network_is_these_weights_or_the_runs_ema():
    """theta^- is the online network, not differentiated (mu = 0), unless target = "ema" asks
    for the second network the trainer offers: its EMA weights (the original paper's)."""
    from difflab.models import UNet, UNetConfig

    method = METHODS["consistency"](MethodConfig(name="consistency"))
    torch.manual_seed(0)
    options = {"channel_mult": (1, 2), "attention_resolutions": (), "num_blocks": 1}
    online, other = (UNet(3, 8, UNetConfig(channels=8, **options)) for _ in range(2))
    for p in [*online.parameters(), *other.parameters()]:
        torch.nn.init.normal_(p, std=0.05)
    draw = method.objective.draw(6, (3, 8, 8), torch.Generator().manual_seed(1), "cpu")
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    args = (method.denoiser(online), x0, draw, None, method.denoiser(other))
    mu_zero = method.objective.loss(*args)
    method.objective.target = "ema"
    with_ema = method.objective.loss(*args)
    assert not torch.allclose(mu_zero, with_ema)
    method.objective.target = "online"
    assert torch.equal(mu_zero, method.objective.loss(*args[:3]))


def test_an_ema_target_without_an_ema_is_refused():
    """target = "ema" with no EMA would silently compare against the online network."""
    from difflab.config import apply_overrides, load_preset, validate
    from difflab.errors import DifflabError

    ema = ["method.consistency.target='ema'"]
    assert validate(apply_overrides(load_preset("consistency-cpu"), ema))
    with pytest.raises(DifflabError, match="needs the run's EMA"):
        validate(
            apply_overrides(load_preset("consistency-cpu"), [*ema, "train.ema_halflife_kimg=0"])
        )
