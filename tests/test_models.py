"""Tests for the raw networks in difflab.models (CPU, small, deterministic)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.models import (
    UNET_CPU,
    UNET_PAPER,
    TutorialUNet,
    UNet,
    UNetConfig,
    count_parameters,
    forward_gflops,
)
from difflab.models.layers import ChannelLayerNorm, group_count

TINY = UNetConfig(channels=32, channel_mult=(1, 2), num_blocks=1, attention_resolutions=(8,))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and immune to OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize_zero_params(net: nn.Module) -> nn.Module:
    """Zero-initialized layers block gradients at init; give them small random values."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return net


# --- parameter counts -------------------------------------------------------------------


def test_tutorial_parameter_counts() -> None:
    assert count_parameters(TutorialUNet(3, 32, "pytorch")) == 4_281_091
    assert count_parameters(TutorialUNet(3, 32, "keras")) == 3_586_819


def test_paper_unet_matches_ddpm_size() -> None:
    n = count_parameters(UNet(3, 32, UNET_PAPER))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert n == 35_746_307


def test_cpu_unet_is_a_few_million() -> None:
    assert 1e6 < count_parameters(UNet(3, 32, UNET_CPU)) < 10e6


# --- tutorial network -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["pytorch", "keras"])
@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_tutorial_output_shape(variant: str, size: int, channels: int) -> None:
    net = TutorialUNet(channels, size, variant)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0.0, 999.0])).shape == x.shape


@pytest.mark.parametrize("variant", ["pytorch", "keras"])
def test_tutorial_intermediate_shapes(variant: str) -> None:
    net = TutorialUNet(3, 32, variant)
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, args, output):
            seen[name] = tuple(output.shape[1:])
            seen[name + ".in"] = tuple(args[0].shape[1:])

        return hook

    for i, block in enumerate(net.down):
        block.register_forward_hook(record(f"down{i}"))
    for i, block in enumerate(net.up):
        block.register_forward_hook(record(f"up{i}"))
    net.bottleneck.register_forward_hook(record("bottleneck"))
    net(torch.randn(1, 3, 32, 32), torch.tensor([10.0]))

    assert [seen[f"down{i}"] for i in range(4)] == [
        (128, 32, 32),
        (128, 16, 16),
        (128, 8, 8),
        (128, 4, 4),
    ]
    assert seen["bottleneck.in"] == (128 * 4 * 4 + 192,)
    assert seen["bottleneck"] == (32 * 4 * 4,)
    # the bottleneck map (32x4x4) is concatenated with the 4x4 skip
    assert [seen[f"up{i}.in"] for i in range(4)] == [
        (160, 4, 4),
        (256, 8, 8),
        (256, 16, 16),
        (256, 32, 32),
    ]
    assert [seen[f"up{i}"] for i in range(4)] == [
        (128, 4, 4),
        (128, 8, 8),
        (128, 16, 16),
        (128, 32, 32),
    ]


def test_keras_variant_normalizes_each_pixel_over_channels() -> None:
    net = TutorialUNet(3, 16, "keras")
    norm = net.down[1].norm
    assert isinstance(norm, ChannelLayerNorm) and norm.norm.eps == 1e-3
    out = {}
    norm.register_forward_hook(lambda m, a, o: out.update(y=o))
    net(torch.randn(2, 3, 16, 16), torch.tensor([3.0, 7.0]))
    y = out["y"]
    assert y.shape == (2, 128, 8, 8)
    assert torch.allclose(y.mean(dim=1), torch.zeros(2, 8, 8), atol=1e-5)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(2, 8, 8), atol=1e-2)


def test_pytorch_variant_normalizes_whole_maps() -> None:
    net = TutorialUNet(3, 16, "pytorch")
    norm = net.down[1].norm
    assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (128, 8, 8)
    out = {}
    norm.register_forward_hook(lambda m, a, o: out.update(y=o))
    net(torch.randn(2, 3, 16, 16), torch.tensor([3.0, 7.0]))
    y = out["y"]
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert not torch.allclose(y.mean(dim=1), torch.zeros(2, 8, 8), atol=1e-2)


@pytest.mark.parametrize(("variant", "nearest"), [("keras", True), ("pytorch", False)])
def test_tutorial_upsampling_mode(variant: str, nearest: bool) -> None:
    net = TutorialUNet(3, 16, variant)
    got = {}
    net.up[1].register_forward_pre_hook(lambda m, args: got.update(x=args[0]))
    net(torch.randn(1, 3, 16, 16), torch.tensor([5.0]))
    up = got["x"][:, :32]  # upsampled bottleneck-level output, before the skip channels
    blocks = up.unfold(2, 2, 2).unfold(3, 2, 2)  # [1, C, 4, 4, 2, 2]
    constant = torch.allclose(blocks, blocks[..., :1, :1].expand_as(blocks))
    assert constant == nearest


def test_tutorial_uses_raw_integer_condition() -> None:
    net = TutorialUNet(3, 8).eval()
    x = torch.randn(1, 3, 8, 8).expand(3, -1, -1, -1)
    y = net(x, torch.tensor([1.0, 2.0, 500.0]))
    assert not torch.allclose(y[0], y[1])
    assert not torch.allclose(y[1], y[2])
    # a 0-d condition is broadcast to the batch
    assert torch.allclose(net(x, torch.tensor(2.0))[0], y[1])


@pytest.mark.parametrize("variant", ["pytorch", "keras"])
def test_tutorial_gradient_reaches_every_parameter(variant: str) -> None:
    net = TutorialUNet(1, 8, variant)
    net(torch.randn(4, 1, 8, 8), torch.tensor([1.0, 5.0, 50.0, 300.0])).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- modern U-Net -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_output_shape(size: int, channels: int) -> None:
    net = UNet(channels, size, dataclasses.replace(TINY, channel_mult=(1, 2, 2)))
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.rand(2)).shape == x.shape


def test_unet_accepts_other_sizes_divisible_by_factor() -> None:
    net = UNet(3, 16, dataclasses.replace(TINY, channel_mult=(1, 2, 2)))
    assert net(torch.randn(1, 3, 8, 12), torch.rand(1)).shape == (1, 3, 8, 12)
    with pytest.raises(DifflabError, match="divisible by 4"):
        net(torch.randn(1, 3, 10, 12), torch.rand(1))


def test_unet_starts_by_predicting_zero() -> None:
    net = UNet(3, 16, TINY)
    assert net(torch.randn(2, 3, 16, 16), torch.rand(2)).abs().max() == 0


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"embedding": "positional", "conditioning": "additive"},
        {"num_classes": 10, "num_heads": 2, "dropout": 0.1},
        {"resample_with_conv": False, "attention_resolutions": ()},
    ],
)
def test_unet_gradient_reaches_every_parameter(changes: dict) -> None:
    cfg = dataclasses.replace(TINY, **changes)
    net = _randomize_zero_params(UNet(3, 16, cfg))
    labels = torch.tensor([0, 3, 9, -1]) if cfg.num_classes else None
    net(torch.randn(4, 3, 16, 16), torch.rand(4), labels).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unet_depends_on_condition() -> None:
    net = _randomize_zero_params(UNet(3, 16, TINY)).eval()
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    y = net(x, torch.tensor([0.1, 0.9]))
    assert not torch.allclose(y[0], y[1])


def test_conditional_unet_uses_labels() -> None:
    net = _randomize_zero_params(UNet(3, 16, dataclasses.replace(TINY, num_classes=10))).eval()
    x = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1)
    t = torch.full((3,), 0.5)
    y = net(x, t, torch.tensor([1, 2, -1]))
    assert not torch.allclose(y[0], y[1])
    # label -1 and labels=None both mean "no class"
    assert torch.allclose(y[2], net(x, t)[2], atol=1e-6)
    assert not torch.allclose(y[2], y[0])


def test_fourier_frequencies_are_in_state_dict() -> None:
    a, b = UNet(3, 16, TINY), UNet(3, 16, TINY)
    assert "fourier.freqs" in a.state_dict()
    b.load_state_dict(_randomize_zero_params(a).state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert torch.equal(a(x, t), b(x, t))


def test_group_count() -> None:
    assert group_count(128) == 32
    assert group_count(48) == 24
    assert group_count(3) == 3


def test_forward_gflops() -> None:
    tutorial = forward_gflops(TutorialUNet(3, 32), 3, 32)
    assert 1.7 < tutorial < 1.9
    no_attn = dataclasses.replace(TINY, attention_resolutions=())
    diff = forward_gflops(UNet(3, 16, TINY), 3, 16) - forward_gflops(UNet(3, 16, no_attn), 3, 16)
    # three attention blocks at 8x8 (1 down, 2 up; the middle one is in both), width 64
    sdpa = 3 * 2 * 2 * 64 * 64 * 64
    convs = 3 * 2 * 4 * 64 * 64 * 64
    assert diff * 1e9 == pytest.approx(sdpa + convs)


@pytest.mark.parametrize("heads", [1, 2])
def test_unet_attention_takes_a_fused_kernel(heads: int) -> None:
    """Self-attention hands scaled_dot_product_attention queries, keys and values whose last
    dimension has stride 1, which every fused kernel needs (PyTorch's checks are shared by the
    CPU and CUDA kernels): with only the flash kernel allowed it runs forward and backward. When
    the heads' channels were strided, PyTorch refused here, and chose its math path, which
    builds the whole attention matrix with batched matmuls, everywhere else (on an H100,
    aten::bmm took 3.8% of a compiled edm-paper step, docs/benchmarks.md "GPU")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = dataclasses.replace(TINY, num_heads=heads)
    net = UNet(3, 16, config)
    x = torch.randn(2, 3, 16, 16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = net(x, torch.rand(2))
        out.square().mean().backward()
    assert out.shape == x.shape and all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_its_definition_in_either_layout(channels_last: bool) -> None:
    """SelfAttention is softmax(q k^T / sqrt(d)) v per head, with q, k, v the thirds of one 1x1
    convolution's channels (head-major within each third, as DDPM's and the diffusers export's
    weights are laid out), in a channels-first and in a channels-last input alike."""
    from difflab.models.unet import SelfAttention

    n, c, h, w, heads = 2, 8, 3, 4, 2
    attn = SelfAttention(c, heads)
    nn.init.normal_(attn.proj.weight)  # zero at init: the residual alone would pass
    x = torch.randn(n, c, h, w)
    d = c // heads
    qkv = attn.qkv(attn.norm(x)).reshape(n, 3, heads, d, h * w)
    q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [N, heads, HW, d]
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    expected = x + attn.proj((weights @ v).transpose(-1, -2).reshape(n, c, h, w))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_splits_a_channels_last_qkv_without_copies(monkeypatch) -> None:
    """On a channels-last input (train.channels_last; a compiled CUDA graph's convolutions are
    channels-last too) the queries, keys and values are views of the qkv convolution's output,
    and the gradient that reaches that convolution is channels-last again: no layout copy
    either way. Before, the heads were copied apart, and the gradient arrived channels-first,
    which the convolution's backward copied back (an aten::copy_ of qkv's shape, [512, 768, 16,
    16], took 4.7% of a compiled edm-paper step on an H200, docs/benchmarks.md "GPU", run 7)."""
    from difflab.models import unet

    attn = unet.SelfAttention(8, 2)
    seen: dict[str, torch.Tensor] = {}

    def keep_qkv(_module, _inputs, out: torch.Tensor) -> None:
        seen["qkv"] = out
        out.register_hook(lambda grad: seen.setdefault("grad", grad))

    fused = unet.F.scaled_dot_product_attention

    def sdpa(q, k, v):
        seen["q"] = q
        return fused(q, k, v)

    attn.qkv.register_forward_hook(keep_qkv)
    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", sdpa)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    attn(x.requires_grad_()).square().sum().backward()
    storage = seen["qkv"].untyped_storage().data_ptr()
    assert seen["q"].untyped_storage().data_ptr() == storage
    assert seen["grad"].is_contiguous(memory_format=torch.channels_last)


# --- user errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TutorialUNet(3, 32, "jax"), "variant"),
        (lambda: TutorialUNet(3, 30), "divisible by 8"),
        (lambda: TutorialUNet(3, 4), "divisible by 8"),
        (lambda: UNet(3, 30, UNetConfig(channel_mult=(1, 2, 2))), "30.*4"),
        (lambda: UNet(3, 32, UNetConfig(attention_resolutions=(5,))), "attention_resolutions"),
        (lambda: UNetConfig(embedding="learned"), "embedding"),
        (lambda: UNetConfig(conditioning="film"), "conditioning"),
        (lambda: UNetConfig(channel_mult=()), "channel_mult"),
        (lambda: UNet(3, 16, dataclasses.replace(TINY, num_heads=3)), "num_heads"),
    ],
)
def test_bad_construction_raises(build, message: str) -> None:
    with pytest.raises(DifflabError, match=message):
        build()


def test_bad_forward_inputs_raise() -> None:
    tut = TutorialUNet(3, 8)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with pytest.raises(DifflabError, match="unconditional"):
        tut(x, t, torch.tensor([0, 1]))
    with pytest.raises(DifflabError, match="8x8"):
        tut(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(DifflabError, match="channel"):
        tut(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(DifflabError, match="noise_condition"):
        tut(x, torch.rand(3))
    unet = UNet(3, 16, TINY)
    with pytest.raises(DifflabError, match="unconditional"):
        unet(torch.randn(2, 3, 16, 16), t, torch.tensor([0, 1]))
    cond = UNet(3, 16, dataclasses.replace(TINY, num_classes=10))
    with pytest.raises(DifflabError, match="labels"):
        cond(torch.randn(2, 3, 16, 16), t, torch.tensor([0, 10]))
    with pytest.raises(DifflabError, match="labels"):
        cond(torch.randn(2, 3, 16, 16), t, torch.tensor([0.0, 1.0]))


def test_keras_variant_uses_keras_initialisation():
    """Keras Dense / Conv2D defaults: glorot-uniform kernels and zero biases."""
    from difflab.models import TutorialUNet

    net = TutorialUNet(variant="keras")
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert all(not m.bias.any() for m in linears)
    dense = net.time_embed[0]  # Linear(1, 192): glorot limit sqrt(6 / (1 + 192))
    assert dense.weight.abs().max() <= (6 / 193) ** 0.5
    assert any(
        m.bias.any()
        for m in TutorialUNet(variant="pytorch").modules()
        if isinstance(m, torch.nn.Linear)
    )
