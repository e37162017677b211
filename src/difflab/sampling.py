"""Generate images in batches with per-image seeds, and record the reverse process."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.denoisers import Denoiser
from difflab.plans import SamplingPlan
from difflab.samplers import SampleNoise, StepCallback
from difflab.viz import to_uint8


@dataclass
class Generated:
    """What ``generate`` made: ``images`` float32 [N, C, H, W] on the CPU, about [-1, 1] and not
    clipped (``viz.save_grid`` clips; ``(images + 1) / 2`` is [0, 1]); ``frames``, when recorded,
    uint8 pictures [steps + 1, R, C, H, W] of every state of the first R images, noise first;
    ``evaluations``: network evaluations per image (a guided one counts its two branches)."""

    images: Tensor = field(repr=False)
    frames: Tensor | None = field(repr=False)
    evaluations: int


class _CountRows:
    """Images through a network's forward (a forward hook): a guided step, which evaluates a
    doubled batch or a second network, counts twice."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, module: object, args: tuple, output: object) -> None:
        self.rows += args[0].shape[0]


def generate(
    denoiser: Denoiser,
    plan: SamplingPlan,
    shape: tuple[int, int, int],
    seeds: list[int],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
    guidance: float = 1.0,
    guide: Denoiser | None = None,
    record: bool | int = False,
    progress: bool = False,
    on_step: StepCallback | None = None,
) -> Generated:
    """Sample ``len(seeds)`` images (image i from ``seeds[i]`` alone, whatever the batch) on
    ``device`` (by default the network's), in eval mode; ``labels`` (one class per image, -1 for
    none), the guidance weight and a ``guide`` (autoguidance) are bound into the denoiser batch
    by batch (``Denoiser.bind``).

    ``record`` keeps every intermediate state of the first ``record`` images (``True``: all), as
    uint8 pictures on the host, for strips and GIFs: 3 KB per 32x32 image and step, so memory
    follows the pictures asked for, not the batch. ``on_step(i, x, x0)`` sees each step's state
    and x0 estimate as they are (float, on the device), batch after batch.
    """
    device = torch.device(device) if device is not None else device_of(denoiser.net)
    keep_images = len(seeds) if record is True else int(record)
    _alpha, sigma = denoiser.process.alpha_sigma(plan.grid[:1])
    scale = float(sigma)  # start at the grid's first noise level; alpha * x0 is neglected
    counter = _CountRows()
    nets = [denoiser.net] + ([guide.net] if guide is not None else [])
    hooks = [net.register_forward_hook(counter) for net in nets]
    modes = [(module, module.training) for net in nets for module in net.modules()]
    outputs, frames = [], []
    try:
        for net in nets:
            net.eval()
        with tqdm(total=len(seeds), desc="sampling", unit="img", disable=not progress) as bar:
            for start in range(0, len(seeds), batch_size):
                chunk = seeds[start : start + batch_size]
                rng = SampleNoise(chunk, device)
                noise = rng.randn(shape) * scale
                chunk_labels = None if labels is None else labels[start : start + len(chunk)]
                bound = denoiser.bind(chunk_labels, guidance, guide)
                kept = max(min(keep_images - start, len(chunk)), 0)
                states = [to_uint8(noise[:kept])] if kept else None

                def keep(i: int, x: Tensor, x0: Tensor, states=states, kept=kept) -> None:
                    if kept:
                        states.append(to_uint8(x[:kept]))
                    if on_step is not None:
                        on_step(i, x, x0)

                watch = keep if kept or on_step is not None else None
                outputs.append(plan(bound, noise, rng, watch).float().cpu())
                if kept:
                    frames.append(torch.stack(states))
                bar.update(len(chunk))
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes:  # each as it was (a frozen part stays in eval)
            module.training = mode
    return Generated(
        images=torch.cat(outputs),
        frames=torch.cat(frames, dim=1) if frames else None,
        evaluations=counter.rows // max(len(seeds), 1),
    )


def device_of(net: torch.nn.Module) -> torch.device:
    """Where a network's weights are (the CPU for one without any)."""
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def strip_indices(num_steps: int, num_frames: int = 8) -> list[int]:
    """Frame indices (into frames[1:]) evenly spaced, ending at the final image.

    For the tutorial's 16 steps and 8 frames: every second step, as the tutorial shows it.
    """
    count = min(num_frames, num_steps)
    return [round((k + 1) * num_steps / count) - 1 for k in range(count)]
