"""Where a training step's time goes (``torch.profiler``), for bench/gpu.py's ``profile`` part."""

from __future__ import annotations

from typing import Any

from common import time_steps
from torch.autograd import DeviceType

from difflab.train.trainer import Trainer

# Kernel families by name (cuDNN/cuBLAS convolutions and matmuls, flash attention, inductor's
# fused Triton kernels); the first match names a kernel's family.
FAMILIES = [
    ("attention", ("flash", "fmha", "attention")),
    ("layout copies", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("convolution/matmul", ("conv", "gemm", "xmma", "cudnn", "cutlass", "sm90", "sm80", "wgrad")),
    ("fused elementwise/norm (Triton)", ("triton",)),
]
TOP = 10


def kernel_shares(trainer: Trainer, steps: int = 3) -> dict[str, Any]:
    """Where a step's time goes: its share by kernel family, the ten costliest kernels and, on a
    GPU, the ten operators whose kernels cost most, with the shapes they took (the ATen
    operator or compiled graph that launched them: what to change to remove a kernel). On a CPU
    (the smoke test) the kernels are ATen's operators."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, record_shapes=cuda) as prof:
        time_steps(trainer, steps)
    events = prof.key_averages()
    if cuda:
        own, kernels = _device_us, device_kernels(events)
        by_shape = prof.key_averages(group_by_input_shape=True)  # which tensors an op took
        launchers = [e for e in by_shape if e.device_type == DeviceType.CPU and own(e) > 0]
    else:
        own = lambda event: float(event.self_cpu_time_total)  # noqa: E731
        kernels, launchers = [e for e in events if own(e) > 0], []
    total = sum(map(own, kernels)) or 1.0
    families: dict[str, float] = {}
    for event in kernels:
        name = event.key.lower()
        family = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
        families[family] = families.get(family, 0.0) + own(event)

    def costliest(events: list, shapes: bool = False) -> list[list]:
        ranked = sorted(events, key=own, reverse=True)[:TOP]
        names = [e.key + (f" {e.input_shapes}" if shapes else "") for e in ranked]
        return [[name[:160], own(e) / total] for name, e in zip(names, ranked, strict=True)]

    return {
        "ms_per_step": total / 1000 / steps,
        "families": {f: us / total for f, us in sorted(families.items(), key=lambda i: -i[1])},
        "top": costliest(kernels),
        **({"launchers": costliest(launchers, shapes=True)} if cuda else {}),
    }


def device_kernels(events: list) -> list:
    """The GPU's kernels among a profile's events: those with GPU time of their own, less the
    user annotations. (Inductor's "## Call CompiledFxGraph ##" ranges lie on the GPU's timeline
    over the kernels they launch: counted, they doubled a compiled step's time on an H200;
    torch's own tables leave them out too.)"""
    return [
        e
        for e in events
        if e.device_type == DeviceType.CUDA
        and _device_us(e) > 0
        and not getattr(e, "is_user_annotation", False)
    ]


def _device_us(event: Any) -> float:
    """An event's own GPU time (``self_device_time_total``; ``self_cuda_time_total`` before)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0
