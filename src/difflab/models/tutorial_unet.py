"""Port of the small U-Net from the "quick diffusion model" tutorial (Seachaos, tree.rocks).

Two variants of the same network:

* ``"pytorch"``: the tutorial's PyTorch notebook. LayerNorm over whole feature maps
  (``LayerNorm([128, s, s])``, eps 1e-5) and bilinear upsampling. 4,281,091 parameters
  at 32x32x3.
* ``"keras"``: the original TensorFlow notebook. Keras ``LayerNormalization()`` normalizes
  the last axis, i.e. over channels per pixel (eps 1e-3), upsampling is nearest, and
  flatten/reshape at the bottleneck use channels-last order. 3,586,819 parameters at
  32x32x3.

The condition is the raw integer step as a float (not normalized), as in the tutorial.
Initialization follows each notebook's framework: PyTorch's defaults for ``"pytorch"``, Keras'
(Glorot-uniform kernels, zero biases) for ``"keras"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.errors import DifflabError
from difflab.models.layers import ChannelLayerNorm, check_inputs

WIDTH = 128  # feature channels of every block
TIME_WIDTH = 192  # width of the time embedding
BOTTLENECK_CHANNELS = 32  # channels of the bottleneck map
VARIANTS = ("pytorch", "keras")


def _map_norm(variant: str, size: int) -> nn.Module:
    """The norm applied to a [N, 128, size, size] feature map in each variant."""
    if variant == "keras":
        return ChannelLayerNorm(WIDTH, eps=1e-3)
    return nn.LayerNorm([WIDTH, size, size])


def _keras_init(module: nn.Module) -> None:
    """Keras' Dense and Conv2D defaults: glorot_uniform kernels, zero biases."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class TutorialBlock(nn.Module):
    """`relu(norm(conv(x) + relu(conv'(x)) * relu(dense(t_emb))))`: the tutorial's block."""

    def __init__(self, in_channels: int, size: int, variant: str) -> None:
        super().__init__()
        self.conv_param = nn.Conv2d(in_channels, WIDTH, 3, padding=1)
        self.dense_ts = nn.Linear(TIME_WIDTH, WIDTH)
        self.conv_out = nn.Conv2d(in_channels, WIDTH, 3, padding=1)
        self.norm = _map_norm(variant, size)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        p = F.relu(self.conv_param(x)) * F.relu(self.dense_ts(t_emb))[:, :, None, None]
        return F.relu(self.norm(self.conv_out(x) + p))


class TutorialUNet(nn.Module):
    """The tutorial's 3-level U-Net; `forward(x, noise_condition, labels=None)`.

    `noise_condition` is the raw integer timestep (as float), shape [N]. The network is
    unconditional: `labels` must be None. Inputs must be `image_size` x `image_size`.
    """

    num_classes = 0  # what every difflab network says: the classes it takes (0: none)

    def __init__(self, image_channels: int = 3, image_size: int = 32, variant: str = "pytorch"):
        super().__init__()
        if variant not in VARIANTS:
            raise DifflabError(f"unknown tutorial variant {variant!r}; use one of {VARIANTS}")
        if image_channels < 1:
            raise DifflabError(f"image_channels must be >= 1, got {image_channels}")
        if image_size < 8 or image_size % 8:
            raise DifflabError(
                f"the tutorial U-Net needs an image size divisible by 8, got {image_size}"
            )
        self.image_channels = image_channels
        self.image_size = image_size
        self.variant = variant
        eps = 1e-3 if variant == "keras" else 1e-5
        s, b = image_size, image_size // 8
        self.bottom = b

        self.time_embed = nn.Sequential(
            nn.Linear(1, TIME_WIDTH), nn.LayerNorm(TIME_WIDTH, eps=eps), nn.ReLU()
        )
        self.down = nn.ModuleList(
            TutorialBlock(c, size, variant)
            for c, size in [(image_channels, s), (WIDTH, s // 2), (WIDTH, s // 4), (WIDTH, b)]
        )
        self.bottleneck = nn.Sequential(
            nn.Linear(WIDTH * b * b + TIME_WIDTH, WIDTH),
            nn.LayerNorm(WIDTH, eps=eps),
            nn.ReLU(),
            nn.Linear(WIDTH, BOTTLENECK_CHANNELS * b * b),
            nn.LayerNorm(BOTTLENECK_CHANNELS * b * b, eps=eps),
            nn.ReLU(),
        )
        self.up = nn.ModuleList(
            TutorialBlock(c, size, variant)
            for c, size in [
                (BOTTLENECK_CHANNELS + WIDTH, b),
                (2 * WIDTH, s // 4),
                (2 * WIDTH, s // 2),
                (2 * WIDTH, s),
            ]
        )
        self.out = nn.Conv2d(WIDTH, image_channels, 1)
        self.upsample_mode = "nearest" if variant == "keras" else "bilinear"
        if variant == "keras":
            self.apply(_keras_init)

    def _flatten(self, x: Tensor) -> Tensor:
        # Keras flattens channels-last tensors; keep its order so Keras weights map 1:1.
        return (x.permute(0, 2, 3, 1) if self.variant == "keras" else x).flatten(1)

    def _unflatten(self, x: Tensor) -> Tensor:
        b = self.bottom
        if self.variant == "keras":
            return x.view(-1, b, b, BOTTLENECK_CHANNELS).permute(0, 3, 1, 2)
        return x.view(-1, BOTTLENECK_CHANNELS, b, b)

    def _upsample(self, x: Tensor) -> Tensor:
        if self.upsample_mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor, noise_condition: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the tutorial's target for `x` at raw step `noise_condition`."""
        if labels is not None:
            raise DifflabError(
                "the tutorial network is unconditional; pass labels=None or use the UNet "
                "with num_classes > 0"
            )
        t = check_inputs(x, noise_condition, self.image_channels, "TutorialUNet")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise DifflabError(
                f"TutorialUNet was built for {self.image_size}x{self.image_size} images, "
                f"got {x.shape[-2]}x{x.shape[-1]}; build it with the matching image_size"
            )
        t_emb = self.time_embed(t.to(x.dtype).view(-1, 1))
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x, t_emb)
            skips.append(x)
        x = self.bottleneck(torch.cat([self._flatten(x), t_emb], dim=1))
        x = self._unflatten(x)
        for i, block in enumerate(self.up):
            if i:
                x = self._upsample(x)
            x = block(torch.cat([x, skips.pop()], dim=1), t_emb)
        return self.out(x)
