"""Building blocks shared by the networks: input checks, norms, condition embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.errors import DifflabError


def check_inputs(x: Tensor, noise_condition: Tensor, image_channels: int, name: str) -> Tensor:
    """Check `x` is [N, C, H, W] and `noise_condition` is [N] (or a scalar); return it as [N]."""
    if x.ndim != 4 or x.shape[1] != image_channels:
        raise DifflabError(
            f"{name} expects images shaped [N, {image_channels}, H, W], got {list(x.shape)}; "
            "pass a batch with the channel count the network was built for"
        )
    if noise_condition.ndim == 0:
        noise_condition = noise_condition.expand(x.shape[0])
    if noise_condition.shape != (x.shape[0],):
        raise DifflabError(
            f"{name} expects noise_condition shaped [{x.shape[0]}] (one value per image), "
            f"got {list(noise_condition.shape)}"
        )
    return noise_condition


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= `max_groups` that divides `channels` (32 for the usual widths)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with `group_count(channels)` groups (Wu & He 2018)."""
    return nn.GroupNorm(group_count(channels), channels)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of an NCHW map, per pixel (Keras `LayerNormalization()`)."""

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def positional_frequencies(
    half: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``w_i = 10000^(-i/(h-1))`` for i < h: the frequencies of ``positional_embedding``."""
    steps = torch.arange(half, device=device, dtype=dtype)
    return torch.exp(-math.log(10000.0) * steps / max(half - 1, 1))


def positional_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of `t * scale` (Vaswani et al. 2017; DDPM, Ho et al. 2020).

    Layout as in DDPM: `[sin(t w_0..w_{h-1}), cos(...)]`, `w_i = 10000^(-i/(h-1))`, h = dim/2.
    """
    freqs = positional_frequencies(dim // 2, t.device)
    args = (t.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class FourierEmbedding(nn.Module):
    """Random Fourier features `[cos(2π f t), sin(2π f t)]`, f ~ N(0, scale²), fixed.

    Tancik et al. 2020; used by NCSN++ (Song et al. 2021) and EDM (Karras et al. 2022).
    The frequencies are a buffer, so they travel in the state_dict.
    """

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim % 2:
            raise DifflabError(f"Fourier embedding needs an even width, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        args = (2 * math.pi) * t.float()[:, None] * self.freqs.float()[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)
