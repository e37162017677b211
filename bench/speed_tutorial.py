"""Issue 2, measured by bench/throughput.py: the tutorial's notebook as a bare PyTorch loop against
difflab's trainer, on the same network, data and batch.

difflab's side is a user of the library: ``Trainer.train_step`` and ``difflab.sampling.generate``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from common import BACKWARD_FACTOR, summarize, timed, trainer_for
from report_speed import TUTORIAL_BATCH
from torch import Tensor, nn

from difflab.config import load_preset
from difflab.data import ImageSet
from difflab.models import count_parameters, forward_gflops
from difflab.registry import build_network
from difflab.sampling import generate
from difflab.seeds import derive_seed, image_seeds
from difflab.train.trainer import Trainer

if TYPE_CHECKING:
    from throughput import Plan

IMAGE_SIZE, CHANNELS = 32, 3
NUM_LEVELS, TUTORIAL_LR = 16, 8e-4


# --------------------------------------------------------------------------- the bare loop


class BareLoop:
    """The tutorial's PyTorch notebook, written out: no difflab code but the network class."""

    def __init__(self, data: ImageSet, seed: int = 0) -> None:
        torch.manual_seed(derive_seed(seed, "init"))  # the trainer's initial weights
        self.model = build_network(load_preset("tutorial"))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=TUTORIAL_LR)
        self.images = data.images.float() / 127.5 - 1.0
        self.time_bar = 1.0 - torch.linspace(0.0, 1.0, NUM_LEVELS + 1)
        self.loss = math.nan

    def forward_noise(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One noise tensor; the image at level t and the one at t + 1 (one step cleaner)."""
        a = self.time_bar[t].view(-1, 1, 1, 1)
        b = self.time_bar[t + 1].view(-1, 1, 1, 1)
        noise = torch.randn_like(x)
        return x * (1 - a) + noise * a, x * (1 - b) + noise * b

    def step(self) -> int:
        """One optimizer step; returns the batch size (the loss is in ``self.loss``)."""
        x = self.images[torch.randint(len(self.images), (TUTORIAL_BATCH,))]
        t = torch.randint(0, NUM_LEVELS, (TUTORIAL_BATCH,))
        img_a, img_b = self.forward_noise(x, t)
        loss = torch.mean(torch.abs(self.model(img_a, t.float()) - img_b))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.loss = loss.item()
        return TUTORIAL_BATCH

    @torch.no_grad()
    def sample(self, count: int) -> Tensor:
        x = torch.randn(count, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
        for i in range(NUM_LEVELS):
            x = self.model(x, torch.full((count,), float(i)))
        return x


# --------------------------------------------------------------------------- difflab's trainer


def trainer_step(trainer: Trainer) -> int:
    """One optimizer step through the public API (EMA and counters included); returns the batch
    size, by how much ``images_seen`` grew."""
    before = trainer.images_seen
    trainer.train_step()
    # ``train_step`` leaves the loss on the device (the loop reads many steps back at once).
    # Read it back right after each timed step, as the bare loop's ``loss.item()`` does and the
    # trainer's step did before ``train_step``, so each CPU step's time includes its loss.
    trainer.read_back()
    return trainer.images_seen - before


def timed_step(step: Callable[[], int]) -> tuple[float, int]:
    """(seconds, images) of one step that returns its batch size."""
    start = time.perf_counter()
    images = step()
    return time.perf_counter() - start, images


def trainer_sample(trainer: Trainer, count: int) -> Tensor:
    """Images through ``difflab.sampling.generate``, as ``Run.sample`` makes them."""
    denoiser = trainer.method.denoiser(trainer.net)
    shape = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    seeds = image_seeds(0, 0, count)
    return generate(denoiser, trainer.plan, shape, seeds, batch_size=count).images


# --------------------------------------------------------------------------- issue 2


def compare_training(bare: BareLoop, trainer: Trainer, plan: Plan) -> dict[str, Any]:
    """Alternate bare and trainer steps so that both see the same background load."""
    steps: dict[str, Callable[[], int]] = {
        "bare": bare.step,
        "difflab": lambda: trainer_step(trainer),
    }
    for _ in range(plan.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {"bare": [], "difflab": []}
    sizes: dict[str, list[int]] = {"bare": [], "difflab": []}
    for k in range(plan.steps):
        for name in ("bare", "difflab") if k % 2 == 0 else ("difflab", "bare"):
            seconds, images = timed_step(steps[name])
            times[name].append(seconds)
            sizes[name].append(images)
    return {name: summarize(times[name], sizes[name]) for name in times}


def compare_sampling(bare: BareLoop, trainer: Trainer, plan: Plan) -> dict[str, Any]:
    """The tutorial's 16-step loop on a batch of 128, bare and through ``generate``."""
    trainer.net.eval()
    runs: dict[str, Callable[[int], Tensor]] = {
        "bare": bare.sample,
        "difflab": lambda count: trainer_sample(trainer, count),
    }
    for run in runs.values():
        run(16)  # warm up at a small batch
    times: dict[str, list[float]] = {"bare": [], "difflab": []}
    for k in range(plan.sample_reps):
        for name in ("bare", "difflab") if k % 2 == 0 else ("difflab", "bare"):
            times[name].append(timed(lambda name=name: runs[name](TUTORIAL_BATCH)))
    trainer.net.train()
    return {name: summarize(s, [TUTORIAL_BATCH] * len(s)) for name, s in times.items()}


def flop_figures(net: nn.Module, images_per_s: float, peak: float) -> dict[str, float]:
    forward = forward_gflops(net, CHANNELS, IMAGE_SIZE)
    achieved = images_per_s * BACKWARD_FACTOR * forward
    return {
        "forward_gflop_per_image": forward,
        "train_gflop_per_image": BACKWARD_FACTOR * forward,
        "achieved_gflops": achieved,
        "fraction_of_peak": achieved / peak,
    }


def tutorial_benchmark(data: ImageSet, plan: Plan, peak: float) -> dict[str, Any]:
    bare = BareLoop(data)
    with trainer_for("tutorial", data, [], device="cpu") as trainer:
        training = compare_training(bare, trainer, plan)
        sampling = compare_sampling(bare, trainer, plan)
        net = trainer.net
        params = count_parameters(net)
        flops = flop_figures(net, training["difflab"]["images_per_s"], peak)
    overhead = 1 - training["difflab"]["images_per_s"] / training["bare"]["images_per_s"]
    overhead_mean = 1 - (
        training["difflab"]["images_per_s_mean"] / training["bare"]["images_per_s_mean"]
    )
    bare_flops = flop_figures(bare.model, training["bare"]["images_per_s"], peak)
    return {
        "batch_size": TUTORIAL_BATCH,
        "parameters": params,
        "training": training,
        "sampling": sampling,
        "trainer_overhead": overhead,
        "trainer_overhead_mean": overhead_mean,
        "flops": flops,
        "bare_achieved_gflops": bare_flops["achieved_gflops"],
        "bare_fraction_of_peak": bare_flops["fraction_of_peak"],
    }


# --------------------------------------------------------------------------- profile


def profile_tutorial(data: ImageSet, rows: int = 20) -> str:
    """Top operators of one bare step and one trainer step (for finding where time goes)."""
    from torch.profiler import ProfilerActivity, profile

    bare = BareLoop(data)
    out = []
    with trainer_for("tutorial", data, [], device="cpu") as trainer:
        bare.step()
        trainer_step(trainer)
        for name, step in (("bare", bare.step), ("difflab", lambda: trainer_step(trainer))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            out.append(f"== {name} step ==\n{table}")
    return "\n".join(out)
