"""Devices: which one to use, how a run sets it up, and how tensors and generators reach it.

Device and dtype follow the data: a function creates what it needs on the device of the tensor
it meets. The helpers here are the few places where that needs care (generators, copies from
the host, the CUDA math settings).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import Tensor

from difflab.errors import DifflabError

#: Work per optimizer step and device (forward GFLOP per image x images) from which
#: ``precision = "auto"`` trains in bf16 on CUDA. Below it, autocast's casts cost more than bf16
#: saves: on one H100 (bench/gpu.py, docs/benchmarks.md "GPU") every -cpu preset (62 GFLOP per
#: step at batch 32, 232 for the tutorial's batch 128) trained 17-21% faster in fp32/TF32 than in
#: bf16. edm-paper at batch 128 (1,593 GFLOP) was within 4% either way eager (fp32 ahead); its
#: fast path is bf16 compiled at batch 512 (2.9 times the eager batch-128 rate).
BF16_MIN_GFLOP_PER_STEP = 300.0


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DifflabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DifflabError("CUDA was requested but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DifflabError(
            f"{name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DifflabError("MPS was requested but is not available; use --device cpu")
    return device


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` that draws on ``device``.

    The shape-only ``meta`` device (used by the tests) has no generator of its own: it ignores
    values, so a CPU generator stands in.
    """
    where = torch.device("cpu") if device.type == "meta" else device
    return torch.Generator(where).manual_seed(seed)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the device queue.

    A plain copy from pageable host memory to CUDA synchronises with the stream; from pinned
    memory it is asynchronous.
    """
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def configure(device: torch.device) -> None:
    """Process-wide math settings for training or sampling on ``device``.

    On CUDA: TF32 for float32 matmuls and convolutions (10-bit mantissa inputs, float32
    accumulation: the usual setting for training, several times the float32 rate on Ampere and
    later), and cuDNN's autotuner, which picks the fastest convolution for the fixed shapes of
    a training run.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


def autocast_dtype(device: torch.device, precision: str, gflop_per_step: float):
    """The autocast dtype of a training step, or None for plain float32.

    ``precision`` is "fp32", "bf16" or "auto"; autocast is used on CUDA only. "auto" chooses by
    size: bf16 when a step does at least ``BF16_MIN_GFLOP_PER_STEP`` of forward work.
    """
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" or gflop_per_step >= BF16_MIN_GFLOP_PER_STEP:
        return torch.bfloat16
    return None


def compiled_layout(layout: str, device: torch.device) -> str:
    """``train.compile_layout`` on ``device``: "auto" is "channels_last" on CUDA and inductor's
    own choice ("inductor") elsewhere.

    Inductor's heuristic leaves a graph channels-first when any 3x3 convolution has at least
    twice as many input channels as output channels, which every U-Net decoder that concatenates
    its skips has; cuDNN's convolutions on an H100 are channels-last, so it then converts
    layouts around each one (27% of a compiled ``edm-paper`` step's GPU time). Forcing the
    layout made that step 12% faster at batch 512 (docs/benchmarks.md "GPU", run 5).
    """
    if layout != "auto":
        return layout
    return "channels_last" if device.type == "cuda" else "inductor"


def compile_module(
    module: torch.nn.Module, mode: str = "default", layout: str = "inductor"
) -> torch.nn.Module:
    """``torch.compile(module)`` in ``mode`` ("default" or one of torch's modes).

    ``layout = "channels_last"`` forces inductor's layout optimization: every convolution of the
    compiled graph, and the buffers between them, channels-last; "inductor" leaves the choice to
    inductor (see ``compiled_layout``). Converting the module itself (``train.channels_last``)
    is not the same: the layout constraints inductor does not plan are then met by eager copies.
    """
    if layout == "inductor":
        return torch.compile(module, mode=None if mode == "default" else mode)
    options = {} if mode == "default" else dict(torch._inductor.list_mode_options(mode))
    return torch.compile(module, options={**options, "force_layout_optimization": True})


def cpu_model() -> str:
    """The processor's name (``/proc/cpuinfo``'s model name where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
