"""A DDPM / ADM style U-Net (Ho et al. 2020; Dhariwal & Nichol 2021; Song et al. 2021).

Layout as DDPM: conv_in, then per level `num_blocks` residual blocks (with self-attention
at `attention_resolutions`) and a downsample between levels, a skip kept after every
module; middle res + attn + res; per level `num_blocks + 1` blocks, each consuming one
skip, and an upsample between levels; GroupNorm -> SiLU -> conv3x3 out.

Build it as `UNet(image_channels, image_size, config)`; vary a preset with
`dataclasses.replace(UNET_CPU, channels=32)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.errors import DifflabError
from difflab.models.layers import FourierEmbedding, check_inputs, group_norm, positional_embedding

EMBEDDINGS = ("positional", "fourier")
CONDITIONINGS = ("scale-shift", "additive")


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of `UNet`; the defaults are a small ADM-flavoured 32x32 model.

    channels: base width; level i has `channels * channel_mult[i]` channels.
    num_blocks: residual blocks per level on the way down (`+1` on the way up).
    attention_resolutions: feature-map sizes (e.g. 16) that get self-attention.
    embedding: "positional" (sinusoidal of `condition * embedding_scale`, DDPM) or
        "fourier" (fixed random Gaussian frequencies of std `fourier_scale`, NCSN++/EDM).
    conditioning: "scale-shift" (ADM: `norm(h) * (1 + s) + b`) or "additive" (DDPM: `h + b`).
    num_classes: 0 for unconditional; else a class embedding is added to the time
        embedding. `labels=None`, or a label of -1, means "no class" (no label term), the
        unconditional branch for classifier-free guidance (Ho & Salimans 2022).
    resample_with_conv: 3x3 convs in down/upsampling (else average pool / plain nearest).
    """

    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    embedding: str = "fourier"
    embedding_scale: float = 1000.0
    fourier_scale: float = 16.0
    conditioning: str = "scale-shift"
    num_heads: int = 1
    num_classes: int = 0
    resample_with_conv: bool = True

    def __post_init__(self) -> None:
        # Accept lists (e.g. from TOML) for the tuple fields.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.channels < 1 or self.channels % 2:
            raise DifflabError(f"UNet channels must be a positive even number, got {self.channels}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise DifflabError(f"channel_mult must be positive integers, got {self.channel_mult}")
        if self.num_blocks < 1:
            raise DifflabError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise DifflabError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embedding not in EMBEDDINGS:
            raise DifflabError(f"unknown embedding {self.embedding!r}; use one of {EMBEDDINGS}")
        if self.conditioning not in CONDITIONINGS:
            raise DifflabError(
                f"unknown conditioning {self.conditioning!r}; use one of {CONDITIONINGS}"
            )
        if self.num_heads < 1:
            raise DifflabError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.num_classes < 0:
            raise DifflabError(
                f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}"
            )


# DDPM's CIFAR-10 model (Ho et al. 2020, App. B): 35.7M parameters reported.
UNET_PAPER = UNetConfig(
    channels=128,
    channel_mult=(1, 2, 2, 2),
    num_blocks=2,
    attention_resolutions=(16,),
    dropout=0.1,
    embedding="positional",
    conditioning="additive",
)
# A few million parameters, quick on a 2-core CPU at 32x32.
UNET_CPU = UNetConfig(channels=64, channel_mult=(1, 2, 2), num_blocks=2, attention_resolutions=(8,))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> (+emb) -> GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.scale_shift = cfg.conditioning == "scale-shift"
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, cout * (2 if self.scale_shift else 1))
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # block starts as identity (DDPM, ADM)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels with a residual connection (DDPM, ADM)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise DifflabError(f"num_heads={num_heads} must divide the width {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        n, c, h, w = x.shape
        heads = self.num_heads
        # Pixels first, [N, H, W, 3C]: a view of a channels-last qkv (train.channels_last; in a
        # compiled CUDA graph, whose convolutions are channels-last, a copy in memory order), one
        # transposing copy of a channels-first one. Each of q, k, v is then [N, heads, HW, d]
        # with a head's channels at stride 1, which every fused attention kernel (flash,
        # memory-efficient, cuDNN) needs (without it PyTorch builds the whole HW x HW matrix with
        # batched matmuls); the gradients stack back into the channels-last layout, so the
        # convolution's backward needs no copy.
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).contiguous()
        qkv = qkv.view(n, h * w, 3, heads, c // heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # [N, HW, heads, d]
        return x + self.proj(out.reshape(n, h, w, c).permute(0, 3, 1, 2))


class Stage(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, cin: int, cout: int, emb_dim: int, cfg: UNetConfig, attn: bool) -> None:
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, cfg)
        self.attn = SelfAttention(cout, cfg.num_heads) if attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class Downsample(nn.Module):
    """Halve the resolution: stride-2 conv3x3, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return F.avg_pool2d(x, 2) if self.conv is None else self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest, then optionally conv3x3."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class UNet(nn.Module):
    """DDPM/ADM U-Net; `forward(x, noise_condition, labels=None) -> same shape as x`.

    `noise_condition` is any O(1) float per image (e.g. t/T, or log-sigma/4); it is
    embedded, never interpreted. Inputs may be any size divisible by the total downsampling
    factor; attention placement follows the `image_size` given here.
    """

    def __init__(self, image_channels: int, image_size: int, config: UNetConfig | None = None):
        super().__init__()
        cfg = UNetConfig() if config is None else config
        if not isinstance(cfg, UNetConfig):
            raise DifflabError(f"config must be a UNetConfig, got {type(cfg).__name__}")
        if image_channels < 1:
            raise DifflabError(f"image_channels must be >= 1, got {image_channels}")
        self.factor = 2 ** (len(cfg.channel_mult) - 1)
        if image_size < self.factor or image_size % self.factor:
            raise DifflabError(
                f"image_size {image_size} must be divisible by 2^{len(cfg.channel_mult) - 1} = "
                f"{self.factor} for channel_mult {cfg.channel_mult}; change one of them"
            )
        resolutions = [image_size // 2**i for i in range(len(cfg.channel_mult))]
        bad = [r for r in cfg.attention_resolutions if r not in resolutions]
        if bad:
            raise DifflabError(
                f"attention_resolutions {bad} are not among this network's resolutions "
                f"{resolutions}; pick from those"
            )
        self.config = cfg
        self.num_classes = cfg.num_classes  # the classes it takes (0: unconditional)
        self.image_channels = image_channels
        self.image_size = image_size
        ch, emb_dim = cfg.channels, 4 * cfg.channels

        self.fourier = (
            FourierEmbedding(ch, cfg.fourier_scale) if cfg.embedding == "fourier" else None
        )
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(image_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chans, cur = [ch], ch
        for level, mult in enumerate(cfg.channel_mult):
            attn = resolutions[level] in cfg.attention_resolutions
            for _ in range(cfg.num_blocks):
                self.down.append(Stage(cur, ch * mult, emb_dim, cfg, attn))
                cur = ch * mult
                skip_chans.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(cur, cfg.resample_with_conv))
                skip_chans.append(cur)

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, emb_dim, cfg),
                SelfAttention(cur, cfg.num_heads),
                ResBlock(cur, cur, emb_dim, cfg),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            attn = resolutions[level] in cfg.attention_resolutions
            out = ch * cfg.channel_mult[level]
            for _ in range(cfg.num_blocks + 1):
                self.up.append(Stage(cur + skip_chans.pop(), out, emb_dim, cfg, attn))
                cur = out
            if level > 0:
                self.up.append(Upsample(cur, cfg.resample_with_conv))

        self.norm_out = group_norm(cur)
        self.conv_out = nn.Conv2d(cur, image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the net starts by predicting zero (DDPM, ADM)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, noise_condition: Tensor, labels: Tensor | None) -> Tensor:
        """Condition (and optional class) embedding, [N, 4 * channels]."""
        cfg = self.config
        if self.fourier is not None:
            e = self.fourier(noise_condition)
        else:
            e = positional_embedding(noise_condition, cfg.channels, cfg.embedding_scale)
        emb = self.time_mlp(e.to(self.conv_in.weight.dtype))
        if labels is None:
            return emb
        if self.label_emb is None:
            raise DifflabError(
                "this UNet is unconditional (num_classes=0); pass labels=None or build it "
                "with num_classes > 0"
            )
        if labels.shape != noise_condition.shape or labels.is_floating_point():
            raise DifflabError(
                f"labels must be integer class ids shaped [{noise_condition.shape[0]}], "
                f"got {labels.dtype} {list(labels.shape)}"
            )
        # Range check only on CPU: on an accelerator it would force a sync every step.
        out_of_range = (labels < -1) | (labels >= cfg.num_classes)
        if labels.device.type == "cpu" and bool(out_of_range.any()):
            raise DifflabError(f"labels must be in [0, {cfg.num_classes}) or -1 for 'no class'")
        keep = (labels >= 0).to(emb.dtype)[:, None]
        return emb + self.label_emb(labels.clamp(min=0)) * keep

    def forward(self, x: Tensor, noise_condition: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the training target for `x` at `noise_condition` (and class `labels`)."""
        t = check_inputs(x, noise_condition, self.image_channels, "UNet")
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise DifflabError(
                f"UNet input {x.shape[-2]}x{x.shape[-1]} must have sides divisible by "
                f"{self.factor}; resize or crop the images"
            )
        emb = self.embed(t, labels)
        h = self.conv_in(x)
        hs = [h]
        for module in self.down:
            h = module(h, emb)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
