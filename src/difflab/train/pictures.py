"""Pictures a run writes: the schedule, the data, the forward process, samples as training goes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from difflab.classes import class_rows, labels_for
from difflab.config import Config
from difflab.data import ImageSet, to_model_range
from difflab.denoisers import Denoiser
from difflab.objectives import Objective
from difflab.plans import SamplingPlan
from difflab.registry import Method
from difflab.sampling import generate, strip_indices
from difflab.schedules import ForwardProcess
from difflab.seeds import derive_seed
from difflab.viz import plot_lines, save_gif, save_grid, save_strip

PREVIEW_SEED = 0  # the same preview noise for every run and checkpoint, so they compare


def schedule_curves(process: ForwardProcess, grid: torch.Tensor) -> dict[str, tuple[list, list]]:
    """Noise (sigma) and clarity (alpha) at each step of the sampler's grid, noise first."""
    alpha, sigma = process.alpha_sigma(grid)
    steps = list(range(len(grid)))
    return {"noise (sigma)": (steps, sigma.tolist()), "clarity (alpha)": (steps, alpha.tolist())}


def forward_examples(
    images: torch.Tensor, objective: Objective, process: ForwardProcess, seed: int = 0
) -> torch.Tensor:
    """Training images noised at times drawn from the method's training distribution."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "forward-examples"))
    x0 = to_model_range(images)
    draw = objective.draw(len(x0), tuple(x0.shape[1:]), gen, x0.device)
    return process.mix(x0, draw.eps, draw.t)


class Pictures:
    def __init__(self, run_dir: Path, method: Method, plan: SamplingPlan, config: Config) -> None:
        self.folder = Path(run_dir) / "pictures"
        self.method, self.plan, self.config = method, plan, config

    @property
    def per_row(self) -> int | None:
        """A conditional run's previews per row, one row per class (None: a square grid)."""
        classes = len(self.config.data.class_names)
        return math.ceil(self.config.train.num_preview / classes) if classes else None

    @property
    def count(self) -> int:
        """How many images a preview samples: ``train.num_preview``, rounded up to full rows
        of classes for a conditional run."""
        classes = len(self.config.data.class_names)
        return self.per_row * classes if classes else self.config.train.num_preview

    def finished(self, checkpoint: Path | None) -> bool:
        """Whether the final pictures of the run as ``checkpoint`` (its newest) holds it were
        drawn: the reverse process's GIF, the last of them, written after the checkpoint (an
        extended run's GIF of its earlier length is not)."""
        gif = self.folder / "reverse-process.gif"
        if not gif.is_file():
            return False
        return checkpoint is None or gif.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns

    def at_start(self, data: ImageSet, objective: Objective) -> None:
        """Schedule plot, a grid of training images and a grid of forward-noised ones."""
        title = f"{self.method.name}: sampler grid ({self.plan.num_steps} steps)"
        curves = schedule_curves(self.method.process, self.plan.grid)
        plot_lines(
            curves,
            self.folder / "schedule.png",
            xlabel="sampler step",
            ylabel="scale",
            title=title,
            logy=self.method.process.variance_exploding,  # EDM's sigma spans 0.002..80
        )
        sample = data.images[: self.config.train.num_preview]
        save_grid(to_model_range(sample), self.folder / "training-images.png")
        noised = forward_examples(sample, objective, self.method.process, self.config.train.seed)
        save_grid(noised, self.folder / "forward-process.png")

    @torch.no_grad()
    def preview(
        self,
        net: nn.Module,
        images_seen: int,
        device: torch.device,
        guide: Denoiser | None = None,
        final: bool = False,
    ) -> None:
        """Samples from fixed seeds (one row per class for a conditional run; at the run's
        guidance, by its guide when it has one), the progress strip of the first, and at the end
        a GIF of them all."""
        size, count, per_row = self.config.data.image_size, self.count, self.per_row
        classes = len(self.config.data.class_names)
        # class i mod C, then rearranged one class per row
        labels = labels_for("all", self.config.data.class_names, count) if classes else None
        seeds = [derive_seed(PREVIEW_SEED, "preview", i) for i in range(count)]
        result = generate(
            self.method.denoiser(net), self.plan, (3, size, size), seeds, device=device,
            labels=labels, guidance=self.config.sampler.guidance, guide=guide, record=True,
        )  # fmt: skip
        images, frames = result.images, result.frames
        if classes:
            images = class_rows(images, classes)[0]
            frames = torch.stack([class_rows(frame, classes)[0] for frame in frames])
        tag = f"{images_seen // 1000:06d}kimg"
        save_grid(images, self.folder / f"samples-{tag}.png", nrow=per_row)
        save_grid(images, self.folder / "samples-latest.png", nrow=per_row)
        strip = result.frames[1:, 0][strip_indices(self.plan.num_steps)]
        save_strip(strip, self.folder / f"strip-{tag}.png")
        if final:
            save_gif(frames, self.folder / "reverse-process.gif", nrow=per_row)
