"""Consistency models (issue 16): the parameterization, the objective, distillation runs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_samplers import MU, NUM, SHAPE, STD, ExactDenoiser

from difflab.api import load_run
from difflab.config import ConsistencyMethod, MethodConfig, SamplerConfig
from difflab.denoisers import Coefficients, Denoiser, Prediction, times_like
from difflab.objectives import ConsistencyDraw, ConsistencyObjective
from difflab.plans import build_sampler
from difflab.registry import METHODS
from difflab.samplers import SampleNoise
from difflab.schedules import LinearPath, consistency_levels, consistency_sigmas
from difflab.seeds import image_seeds
from difflab.train.checkpoint import list_checkpoints


@pytest.mark.parametrize("base", ["edm", "flow"])
def test_the_boundary_condition_holds_exactly_whatever_the_network_says(base):
    """f(x, sigma_min) = x / alpha (Song et al. 2023, eq. 5) on any base process; above it f is
    the base parameterization's own x0 (so a teacher's weights are the student's exact start)."""
    method = METHODS["consistency"](
        MethodConfig("consistency", consistency=ConsistencyMethod(base=base))
    )
    param, inner = method.parameterization, method.parameterization.inner
    x, out = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 100
    full = [torch.full((4, 1, 1, 1), v) for v in (0.5, 0.001, -1.0, 1.0)]  # d/dt: flow's
    at_min = Coefficients(*full)  # sigma / alpha = sigma_min, exactly in float32
    assert torch.equal(param.to_x0_eps(out, x, at_min).x0, x / 0.5)
    t = method.process.t_from_ratio(torch.full((4,), 80.0))
    high = Coefficients.at(method.process, t, 4, derivatives=True)
    gap = param.to_x0_eps(out, x, high).x0 - inner.to_x0_eps(out, x, high).x0
    assert gap.abs().max() < 0.002 / 80 * 1e3


def test_on_edms_preconditioning_c_out_is_song_et_als():
    """c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2) (Song et al. 2023, App. C)."""
    param = METHODS["consistency"](MethodConfig("consistency")).parameterization
    sigma = torch.tensor([0.002, 0.01, 0.5, 3.0, 80.0]).reshape(5, 1, 1, 1)
    out, x = torch.ones(5, 1, 1, 1), torch.zeros(5, 1, 1, 1)
    c_out = param.to_x0_eps(out, x, Coefficients(torch.ones_like(sigma), sigma)).x0
    expected = 0.5 * (sigma - 0.002) / (0.25 + sigma**2).sqrt()
    assert torch.allclose(c_out, expected, atol=1e-7)


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
    # On the flow base the same levels are drawn, and t is the flow time whose sigma / alpha is s.
    flow = ConsistencyObjective(process=LinearPath(), start_levels=20, max_levels=20)
    on_flow = flow.draw(20_000, (1, 1, 1), torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(on_flow.s, draw.t) and torch.equal(on_flow.s_low, draw.t_low)
    assert torch.allclose(on_flow.t, draw.t / (1 + draw.t)) and (on_flow.t < 1).all()


def test_the_teachers_ode_step_is_right_for_a_flow_teacher():
    """Distillation steps the teacher's ODE in EDM's variables, whatever its own process: on
    the exact Gaussian flow denoiser a Heun step matches the exact flow map closely."""
    flow = METHODS["flow"](MethodConfig(name="flow"))
    objective = ConsistencyObjective(teacher=lambda device: ExactDenoiser(flow))
    objective.prepare(torch.device("cpu"))
    high, low = torch.full((9,), 2.0), torch.full((9,), 1.6)
    y = torch.linspace(-6.0, 6.0, 9).reshape(9, 1, 1, 1)
    draw = ConsistencyDraw(high, torch.zeros_like(y), low, high, low)  # EDM's times are ratios
    stepped = objective._step_back(y, draw, None)
    exact = MU + (y - MU) * (1.6**2 + STD**2) ** 0.5 / (2.0**2 + STD**2) ** 0.5
    assert (stepped - exact).abs().max() < 2e-3


class ExactConsistency(Denoiser):
    """The exact consistency function of Gaussian data N(MU, STD^2) on a method's process: the
    probability-flow ODE keeps (y - MU) / sqrt(s^2 + STD^2), so f = MU + (y - MU) STD /
    sqrt(s^2 + STD^2) with y = x / alpha, s = sigma / alpha."""

    def __init__(self, method):
        super().__init__(torch.nn.Identity(), method.process, method.parameterization)

    def forward(self, x, t, labels=None):
        c = self.coefficients(times_like(t, x), x.ndim)
        y, s = x / c.alpha, c.sigma / c.alpha
        x0 = MU + (y - MU) * STD / (s**2 + STD**2).sqrt()
        return Prediction(x0, (x - c.alpha * x0) / c.sigma)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_sampling_is_the_same_on_every_base(steps):
    """Algorithm 1 re-noises in EDM's variables, so the same noise gives the same images on the
    flow base as on EDM's, and the exact consistency function gives the data's moments."""
    images = {}
    for base in ("edm", "flow"):
        config = MethodConfig("consistency", consistency=ConsistencyMethod(base=base))
        method = METHODS["consistency"](config)
        plan = build_sampler(method, SamplerConfig(name="consistency", steps=steps))
        rng = SampleNoise(image_seeds(0, 0, NUM))
        noise = rng.randn(SHAPE) * float(method.process.alpha_sigma(plan.grid[:1])[1])
        images[base] = plan(ExactConsistency(method), noise, rng)
    assert torch.allclose(images["flow"], images["edm"], atol=1e-4)
    assert abs(images["edm"].mean() - MU) < 0.02 and abs(images["edm"].std() - STD) < 0.02


# --------------------------------------------------------------------------- runs


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
    # --rho moves the few-step grid's levels (2 steps: 80, then 2.52 at rho 7, 10.9 at rho 3).
    rho3 = run.sample(5, seed=3, plan=run.plan(steps=2, rho=3.0))
    assert not torch.equal(rho3, two)
    code, _, err = run_cli(capsys, "sample", tmp_path / "student", "--num", 2, "--steps", 2,
                           "--rho", 3, "--out", tmp_path / "r")  # fmt: skip
    assert code == 0, err
    assert (
        run_cli(capsys, "sample", tmp_path / "student", "--rho", 0, "--out", tmp_path / "q")[0] == 2
    )


def test_sigma_max_moves_where_the_student_starts(teacher, tmp_path, capsys):
    """``sampler.sigma_max`` (``--sigma-max``, EDM's sampler's sigma_max) is the top of the
    few-step grid: one step starts from noise at that level instead of the method's 80."""
    from difflab.schedules import edm_sigma_grid

    _distill(capsys, teacher, tmp_path / "student", "--steps", 2)
    run = load_run(tmp_path / "student", device="cpu")

    def levels(plan) -> list[float]:  # the grid as sigma / alpha, whatever the process
        alpha, sigma = run.method.process.alpha_sigma(plan.grid[:-1])
        return (sigma / alpha).tolist()

    assert levels(run.plan(steps=1)) == pytest.approx([80.0])
    assert levels(run.plan(steps=1, sigma_max=10.0)) == pytest.approx([10.0])
    two = edm_sigma_grid(3, 0.002, 10.0, 7.0)[:2].tolist()
    assert levels(run.plan(steps=2, sigma_max=10.0)) == pytest.approx(two)
    low = run.sample(3, seed=1, plan=run.plan(steps=1, sigma_max=10.0))
    assert not torch.equal(low, run.sample(3, seed=1))
    student, out = tmp_path / "student", tmp_path / "s"
    code, _, err = run_cli(capsys, "sample", student, "--num", 2, "--sigma-max", 10, "--out", out)
    assert code == 0, err
    for bad, says in ((["--sigma-max", 0.001], "above the grid's lowest level"),
                      (["--grid", "process", "--sigma-max", 10], "the process grid has its own")):  # fmt: skip
        code, _, err = run_cli(capsys, "sample", student, *bad, "--out", tmp_path / "bad")
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # masks drawn afresh each step, and shared
def test_resuming_a_distillation_is_bit_exact(teacher, tmp_path, capsys, dropout):
    drop = ("--set", f"network.unet.dropout={dropout}")
    _distill(capsys, teacher, tmp_path / "straight", "--steps", 6, *drop)
    _distill(capsys, teacher, tmp_path / "halves", "--steps", 3, *drop)
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "halves", "--steps", 6)
    assert code == 0, err
    ours, theirs = (
        load_file(str(list_checkpoints(tmp_path / name)[-1] / "net.safetensors"))
        for name in ("straight", "halves")
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_distillation_cut_off_before_its_first_checkpoint_resumes_from_the_teacher(
    teacher, tmp_path, capsys, monkeypatch
):
    """A run started from other weights (distill, --init) checkpoints them as step 0: a resume
    after a crash before its first checkpoint goes on from them, bit-exactly, not from a random
    network (config.json does not say where the weights came from)."""
    from difflab.train.trainer import Trainer

    _distill(capsys, teacher, tmp_path / "straight", "--steps", 4)
    step = Trainer.train_step

    def power_cut(self):
        raise RuntimeError("power cut")

    monkeypatch.setattr(Trainer, "train_step", power_cut)
    code, _, err = run_cli(capsys, "distill", teacher, "--out", tmp_path / "cut", "--steps", 4)
    assert code == 1 and "power cut" in err, err
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-00000000"]
    monkeypatch.setattr(Trainer, "train_step", step)
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "cut", "--no-progress")
    assert code == 0, err
    ours, theirs = (
        load_file(str(list_checkpoints(tmp_path / name)[-1] / "net.safetensors"))
        for name in ("straight", "cut")
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
    for bad in ("method.consistency.sigma_max=1e-3", "method.consistency.sigma_max=40"):
        code, _, err = run_cli(capsys, "distill", teacher, "--out", tmp_path / "w", "--steps", 1,
                               "--set", bad, "--set", "method.consistency.base='flow'")  # fmt: skip
        assert code == 2 and "method.consistency.sigma_m" in err and len(err.splitlines()) == 1, err


def test_a_flow_students_start_is_its_teacher_and_a_ddpm_teacher_is_named(
    tiny_preset, image_folder, tmp_path, capsys
):
    """A flow teacher's student is built on flow (methods.md 2.8): with a learning rate of 0,
    its x0 is the teacher's wherever sigma / alpha is well above sigma_min. A DDPM network
    sees other inputs than any consistency function, and distilling one says so."""
    for method in ("flow", "ddpm"):
        args = ["train", "--preset", tiny_preset, "--data", image_folder, "--method", method]
        assert run_cli(capsys, *args, "--out", tmp_path / method, "--steps", 2,
                       "--no-progress")[0] == 0  # fmt: skip
    code, _, err = run_cli(capsys, "distill", tmp_path / "flow", "--out", tmp_path / "s",
                           "--steps", 1, "--no-progress", "--set", "train.lr=1e-30")  # fmt: skip
    assert code == 0 and "weak start" not in err, err
    teacher, student = load_run(tmp_path / "flow"), load_run(tmp_path / "s")
    assert student.config.method.consistency.base == "flow"
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 0.6, 0.9])  # sigma / alpha 0.43 to 9
    with torch.no_grad():
        mine = student.method.denoiser(student.net)(x, t).x0
        theirs = teacher.method.denoiser(teacher.net)(x, t).x0
    y = x / (1 - t).reshape(3, 1, 1, 1)
    assert torch.allclose(mine - y, (1 - 0.002 / (t / (1 - t))).reshape(3, 1, 1, 1) * (theirs - y),
                          atol=1e-5)  # fmt: skip
    code, _, err = run_cli(capsys, "distill", tmp_path / "ddpm", "--out", tmp_path / "d",
                           "--steps", 1, "--no-progress")  # fmt: skip
    assert code == 0 and "is a ddpm run" in err and "weak start" in err, err
    assert load_run(tmp_path / "d").config.method.consistency.base == "edm"


def test_uniform_weighting_draws_every_pair_alike_and_drops_lambda():
    """weighting = "uniform" is Song et al. 2023's: n uniform over the N - 1 pairs (the top pair
    as often as any, where the log-normal gives it a fraction of a percent) and lambda = 1."""
    objective = ConsistencyObjective(start_levels=18, max_levels=18, weighting="uniform")
    draw = objective.draw(18_000, (1, 1, 1), torch.Generator().manual_seed(0), "cpu")
    sigmas = consistency_sigmas(19, 0.002, 80.0, 7.0).float()
    counts = torch.bincount(torch.searchsorted(sigmas, draw.t_low), minlength=18)
    assert counts.min() > 850 and counts.max() < 1150  # 1,000 each, within 5 sigma
    log_normal = ConsistencyObjective(start_levels=18, max_levels=18)
    top = log_normal.draw(18_000, (1, 1, 1), torch.Generator().manual_seed(0), "cpu")
    assert (top.t > 79).sum() < 100 < (draw.t > 79).sum()
    # The same pair and images: the log-normal recipe's loss is the uniform one's / (s - s_low).
    from difflab.models import UNet, UNetConfig

    method = METHODS["consistency"](MethodConfig(name="consistency"))
    options = {"channel_mult": (1, 2), "attention_resolutions": (), "num_blocks": 1}
    net = method.denoiser(UNet(3, 8, UNetConfig(channels=8, **options)))
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    pairs = draw[:4]
    pairs = ConsistencyDraw(pairs.t, torch.randn(4, 3, 8, 8), pairs.t_low, pairs.s, pairs.s_low)
    uniform = dataclasses.replace(method.objective, weighting="uniform").loss(net, x0, pairs)
    weighted = method.objective.loss(net, x0, pairs)
    assert torch.allclose(weighted, uniform / (pairs.s - pairs.s_low))


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


def test_the_target_pass_draws_the_online_passs_dropout_masks():
    """With dropout, f(x_{n+1}) and its target f(x_n) are one sub-network: the target pass
    draws the online pass's masks (Song et al.'s code and ECT reset the random state between
    the two), so two equal points are consistent exactly; the draws after the loss go on as
    after one pass."""
    from difflab.models import UNet, UNetConfig

    method = METHODS["consistency"](MethodConfig(name="consistency"))
    options = {"channel_mult": (1, 2), "attention_resolutions": (), "num_blocks": 1}
    torch.manual_seed(0)
    net = method.denoiser(UNet(3, 8, UNetConfig(channels=8, dropout=0.5, **options)))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    objective = dataclasses.replace(method.objective, weighting="uniform")  # no 1 / (s - s)
    s = torch.full((4,), 3.0)
    same = ConsistencyDraw(s, torch.randn(4, 3, 8, 8), s, s, s)  # x_n = x_{n+1}
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(1)
    assert torch.equal(objective.loss(net, x0, same), torch.zeros(4))
    after_loss = torch.rand(1)
    torch.manual_seed(1)
    online = net(x0 + 3.0 * same.eps, same.t)  # one pass, its masks
    assert torch.equal(after_loss, torch.rand(1))
    assert not torch.equal(online.x0, net(x0 + 3.0 * same.eps, same.t).x0)  # masks do differ


def test_a_distillation_against_its_ema_logs_the_ema_loss(teacher, tmp_path, capsys):
    """With target = "ema" the logged EMA loss compares the EMA with its own target, as the
    step compares the weights with theirs (it crashed at the first log line: no target)."""
    ema = ["--set", "method.consistency.target='ema'", "--set", "train.log_every=1"]
    _distill(capsys, teacher, tmp_path / "student", "--steps", 2, *ema)
    lines = (tmp_path / "student" / "log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["ema_loss"] for line in lines]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), losses


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


def test_distilling_an_autoguided_teacher_steps_along_its_guided_ode(
    teacher, tiny_preset, image_folder, tmp_path, capsys
):
    """--guide makes the teacher's ODE the autoguided one (Karras et al. 2024): its x0 is
    guide + w (teacher - guide), so the student learns the guided sampler."""
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--no-progress"]
    assert run_cli(capsys, *args, "--out", tmp_path / "weak", "--steps", 1)[0] == 0
    _distill(capsys, teacher, tmp_path / "s", "--steps", 1, "--guide", tmp_path / "weak",
             "--guidance", 3)  # fmt: skip
    student = load_run(tmp_path / "s")
    options = student.config.method.consistency
    assert options.teacher_guide == str((tmp_path / "weak").resolve())
    assert options.teacher_guidance == 3
    student.method.objective.prepare(torch.device("cpu"))
    guided = student.method.objective._teacher
    strong, weak = load_run(teacher), load_run(tmp_path / "weak")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        mix = guided(x, t).x0
        ours = strong.method.denoiser(strong.net)(x, t).x0
        theirs = weak.method.denoiser(weak.net)(x, t).x0
    assert not torch.allclose(ours, theirs)
    assert torch.allclose(mix, theirs + 3 * (ours - theirs), atol=1e-5)

    assert (
        run_cli(capsys, *args, "--out", tmp_path / "ddpm", "--steps", 1, "--method", "ddpm")[0] == 0
    )
    for extra, says in (
        (["--guide", tmp_path / "ddpm"], "another method"),
        (["--guide", tmp_path / "nowhere"], "the guide:"),
        (["--guide", tmp_path / "weak", "--no-teacher"], "drop --no-teacher"),
        (["--guidance", 3, "--no-teacher"], "drop --no-teacher"),
        (["--guidance", 2], "name a --guide"),
    ):
        code, _, err = run_cli(capsys, "distill", teacher, "--out", tmp_path / "x", "--steps", 1,
                               *extra)  # fmt: skip
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_teacher_that_samples_autoguided_is_distilled_with_its_own_guide(
    tiny_preset, image_folder, tmp_path, capsys
):
    """A teacher run with ``sampler.guide_at`` (as flow-cpu) samples autoguided: by default
    its student learns that sampler, guided by the teacher's own guide checkpoint and w;
    --guidance 1 distils the plain one."""
    args = ["train", "--preset", tiny_preset, "--data", image_folder, "--no-progress",
            "--set", "sampler.guide_at=0.5", "--set", "sampler.guidance=1.5"]  # fmt: skip
    assert run_cli(capsys, *args, "--out", tmp_path / "t", "--steps", 4)[0] == 0
    _distill(capsys, tmp_path / "t", tmp_path / "s", "--steps", 1)
    options = load_run(tmp_path / "s").config.method.consistency
    folder = list_checkpoints(tmp_path / "t")[0]
    assert (folder / "guide").exists() and folder.name == "step-00000002"
    assert (options.teacher_guide, options.teacher_guidance) == (str(folder.resolve()), 1.5)
    _distill(capsys, tmp_path / "t", tmp_path / "plain", "--steps", 1, "--guidance", 1)
    assert load_run(tmp_path / "plain").config.method.consistency.teacher_guide == ""
    # An export carries the run's guide (keys guide.*): distilled from it, the teacher is the same
    # autoguided denoiser as the run's
    export = tmp_path / "t.safetensors"
    assert run_cli(capsys, "export", tmp_path / "t", "--out", export)[0] == 0
    _distill(capsys, export, tmp_path / "from-export", "--steps", 1)
    options = load_run(tmp_path / "from-export").config.method.consistency
    assert (options.teacher_guide, options.teacher_guidance) == (str(export.resolve()), 1.5)
    teachers = []
    for student in ("s", "from-export", "plain"):
        objective = load_run(tmp_path / student).method.objective
        objective.prepare(torch.device("cpu"))
        teachers.append(objective._teacher)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        run_x0, export_x0, plain_x0 = (teacher(x, t).x0 for teacher in teachers)
    assert torch.equal(run_x0, export_x0) and not torch.allclose(run_x0, plain_x0)
    # exported at its guide's own step, it carries no guide: distilled plainly, and it says so
    early = tmp_path / "early.safetensors"
    assert run_cli(capsys, "export", tmp_path / "t", "--checkpoint", folder, "--out", early)[0] == 0
    code, _, err = run_cli(capsys, "distill", early, "--out", tmp_path / "e", "--steps", 1,
                           "--no-progress")  # fmt: skip
    assert code == 0 and "carries no guide" in err, err
    assert load_run(tmp_path / "e").config.method.consistency.teacher_guide == ""
