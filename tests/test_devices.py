"""Device correctness, checked on the CPU: the network lives on PyTorch's ``meta`` device.

A meta tensor has a shape and a device but no values. Mixing it with a CPU tensor that is not
a 0-d scalar raises "Tensor on device cpu is not on the expected device meta", exactly where a
CUDA run raises "Expected all tensors to be on the same device"; reading a meta value
(``.item()``, ``float()``, ``.tolist()``) raises too, which is where a CUDA run would wait for
the GPU. So a sampler or a training step that runs here end to end keeps every tensor it makes
on the images' device and does not read the device back.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PRESET

from difflab.config import SamplerConfig, apply_overrides, from_dict, validate
from difflab.data import ImageSet
from difflab.devices import compile_module, compiled_layout
from difflab.plans import SAMPLERS, build_sampler
from difflab.registry import METHODS, build_method, build_network
from difflab.samplers import SampleNoise
from difflab.seeds import image_seeds

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

META = torch.device("meta")
SHAPE = (3, 8, 8)


#: Methods by name, and a consistency model on flow's process (a flow teacher's student).
VARIANTS = {"cm-flow": ("consistency", "method.consistency.base='flow'")}


def _config(method: str, *overrides: str):
    config = from_dict(tomllib.loads(TINY_PRESET))
    method, *base = VARIANTS.get(method, (method,))
    return validate(apply_overrides(config, [f"method.name={method!r}", *base, *overrides]))


def _pairs():
    for method in [*METHODS, *VARIANTS]:
        chosen = build_method(_config(method))
        for sampler, spec in SAMPLERS.items():
            if spec.requires(chosen):
                yield pytest.param(method, sampler, id=f"{method}-{sampler}")


@pytest.mark.parametrize("guided", ["", "class", "auto"], ids=["plain", "class-guided", "auto"])
@pytest.mark.parametrize(("method", "sampler"), list(_pairs()))
def test_every_sampler_keeps_the_work_on_the_images_device(method, sampler, guided):
    """Every sampler, also with a class-conditional network, labels bound and guidance 2, and
    with autoguidance by a second network."""
    classes = 2 if guided == "class" else 0
    config = _config(method, "network.name='unet'", f"network.unet.num_classes={classes}")
    chosen = build_method(config)
    steps = chosen.default_steps if method == "tutorial" else 3
    plan = build_sampler(chosen, SamplerConfig(name=sampler, steps=steps))
    net = build_network(config).to(META)
    rng = SampleNoise(image_seeds(0, 0, 2), META)
    noise = rng.randn(SHAPE)
    seen = []
    labels = torch.tensor([0, 1]) if classes else None
    guide = chosen.denoiser(build_network(config).to(META)) if guided == "auto" else None
    denoiser = chosen.denoiser(net).bind(labels, 2.0, guide)
    out = plan(denoiser, noise, rng, on_step=lambda i, x, x0: seen.append(x0.device))
    assert out.device == META and out.shape == (2, *SHAPE)
    assert seen == [META] * plan.num_steps


def test_sample_noise_is_the_same_on_every_device():
    """Noise comes from per-image CPU generators, so a seed gives one image on every device."""
    seeds = image_seeds(3, 0, 2)
    cpu = SampleNoise(seeds).randn(SHAPE)
    assert SampleNoise(seeds, META).randn(SHAPE).device == META
    assert torch.equal(cpu, SampleNoise(seeds, "cpu").randn(SHAPE))


@pytest.mark.parametrize("method", ["tutorial", "ddpm", "flow", "edm", "consistency", "cm-flow"])
def test_a_training_step_runs_on_meta_without_reading_the_device(tmp_path, method):
    from difflab.train.trainer import Trainer

    network = "tutorial" if method == "tutorial" else "unet"
    config = _config(method, f"network.name={network!r}", "train.batch_size=4", "sampler.steps=0")
    images = torch.randint(0, 256, (6, *SHAPE), dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(6, dtype=torch.int64), [], "synthetic")
    with Trainer(config, tmp_path / "run", data=data, device=META) as trainer:
        trainer.train_step()
        trainer.train_step()
        assert (trainer.step, trainer.images_seen) == (2, 8)
        assert all(p.device == META for p in trainer.net.parameters())
        if trainer.ema is not None:
            assert all(p.device == META for p in trainer.ema.parameters())


def test_precision_auto_chooses_bf16_by_the_work_of_a_step():
    from difflab.devices import BF16_MIN_GFLOP_PER_STEP, autocast_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    flow_cpu_batch_32 = 1.95 * 32  # measured faster in fp32 on an H100 (issue 13)
    edm_paper_batch_128 = 12.44 * 128
    assert autocast_dtype(cuda, "auto", flow_cpu_batch_32) is None
    assert autocast_dtype(cuda, "auto", edm_paper_batch_128) is torch.bfloat16
    assert autocast_dtype(cuda, "auto", BF16_MIN_GFLOP_PER_STEP) is torch.bfloat16
    assert autocast_dtype(cuda, "bf16", 1.0) is torch.bfloat16
    assert autocast_dtype(cuda, "fp32", 1e6) is None
    assert all(autocast_dtype(cpu, p, 1e6) is None for p in ("auto", "bf16", "fp32"))


@pytest.mark.parametrize(
    ("mode", "layout", "expected"),
    [
        ("default", "auto", {"mode": None}),  # auto off CUDA: inductor's own layout
        ("default", "inductor", {"mode": None}),
        ("reduce-overhead", "inductor", {"mode": "reduce-overhead"}),
        ("default", "channels_last", {"options": {"force_layout_optimization": True}}),
        (
            "reduce-overhead",
            "channels_last",
            {"options": {"triton.cudagraphs": True, "force_layout_optimization": True}},
        ),
    ],
)
def test_the_compiled_layout_reaches_inductor_with_the_mode(
    tmp_path, monkeypatch, mode, layout, expected
):
    """train.compile_layout = "channels_last" forces inductor's layout optimization (which its
    heuristic leaves off for U-Nets), keeping the mode's own options; "inductor", and "auto" off
    CUDA, are torch's default. The trainer compiles with the run's settings (torch.compile
    recorded, not run, on meta)."""
    from difflab.train.trainer import Trainer

    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append(kwargs) or module)
    overrides = ["train.batch_size=4", "sampler.steps=0", "train.compile=true"]
    overrides += [f"train.compile_mode={mode!r}", f"train.compile_layout={layout!r}"]
    images = torch.randint(0, 256, (6, *SHAPE), dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(6, dtype=torch.int64), [], "synthetic")
    with Trainer(_config("edm", *overrides), tmp_path / "run", data=data, device=META) as trainer:
        trainer.train_step()
    assert calls == [expected]
    # the real torch.compile accepts the option (it refuses unknown ones when called)
    monkeypatch.undo()

    compile_module(torch.nn.Conv2d(3, 3, 3), mode, compiled_layout(layout, META))


def test_auto_lays_a_compiled_graph_out_channels_last_on_cuda_only():
    """On CUDA, where cuDNN's convolutions are channels-last, "auto" forces the layout (+12% for
    a compiled edm-paper step on an H100); elsewhere inductor chooses; explicit values stay."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compiled_layout("auto", cuda) == "channels_last"
    assert compiled_layout("auto", cpu) == compiled_layout("auto", META) == "inductor"
    assert all(
        compiled_layout(v, d) == v for v in ("inductor", "channels_last") for d in (cuda, cpu)
    )
