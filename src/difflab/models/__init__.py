"""Raw denoising networks: `forward(x, noise_condition, labels=None) -> tensor like x`.

Networks know nothing about noise schedules; the condition is whatever float the
training objective feeds them. Each says how many classes it takes in `num_classes`
(0: unconditional); a label of -1 means "no class".
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from difflab.models.tutorial_unet import TutorialUNet
from difflab.models.unet import UNET_CPU, UNET_PAPER, UNet, UNetConfig

__all__ = [
    "UNET_CPU",
    "UNET_PAPER",
    "TutorialUNet",
    "UNet",
    "UNetConfig",
    "count_parameters",
    "forward_gflops",
]


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV as two batched matmuls, 2 FLOPs per multiply-add."""
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def _extra_flop_formulas() -> dict:
    # FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _sdpa_flops}


@torch.no_grad()
def forward_gflops(net: nn.Module, image_channels: int, image_size: int) -> float:
    """GFLOP of one forward pass for one image (multiply-add = 2 FLOPs, as FlopCounterMode)."""
    p = next(net.parameters())
    x = torch.zeros(1, image_channels, image_size, image_size, device=p.device, dtype=p.dtype)
    cond = torch.ones(1, device=p.device)
    was_training = net.training
    net.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
            net(x, cond)
    finally:
        net.train(was_training)
    return counter.get_total_flops() / 1e9
