"""The figures of docs/methods.md, computed from difflab's own processes and samplers.

    python bench/figures.py [--data ../shared/data/cifar10-jpg/train] [--out docs/figures]

No training and no network: every curve comes from a forward process's ``alpha_sigma`` and the
grids that ``plans.build_sampler`` chooses, and ``detail-kept.png`` runs difflab's samplers
with the exact denoiser of a Gaussian. Images are real CIFAR-10 cars read from ``--data`` (an
image folder with an ``automobile`` class; set $DIFFLAB_CIFAR_DIR to change the default), shown
clipped to [-1, 1] by ``viz.to_uint8``, never stretched. Deterministic (fixed seeds, one thread);
about 15 seconds on one CPU core.

Figures written to ``--out``:

- ``schedules.png``: alpha, sigma, log SNR and the std of x_t along each method's sampler grid.
- ``forward-process.png``: one car noised by every method at the same six sigma/alpha ratios,
  with the same noise image.
- ``tutorial-forward-noise.png``: the tutorial's ``forward_noise`` pairs (level k, level k+1).
- ``detail-kept.png``: the std that each sampler keeps of a Gaussian component of std s,
  against s, with the spread of the DCT-coefficient stds of CIFAR-10 cars.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn

from difflab.config import MethodConfig, SamplerConfig
from difflab.denoisers import Denoiser, times_like
from difflab.plans import SamplingPlan, build_sampler
from difflab.registry import METHODS, Method
from difflab.schedules import TutorialPath
from difflab.viz import to_uint8

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get(
    "DIFFLAB_CIFAR_DIR", str(ROOT.parent / "shared" / "data" / "cifar10-jpg" / "train")
)
CARS = ("automobile/0001.jpg", "automobile/0016.jpg")  # two clear cars of the training split
NOISE_SEED = 2024
SIGMA_DATA = 0.5  # std of the data for the std(x_t) panel (EDM's sigma_data)
# The forward-process columns: tutorial levels k (t = 1 - k/16), i.e. sigma/alpha = t / (1 - t).
LEVELS = (15, 13, 11, 8, 4, 1)


def method(name: str) -> Method:
    return METHODS[name](MethodConfig(name=name))


def plan(m: Method, **sampler: object) -> SamplingPlan:
    return build_sampler(m, SamplerConfig(**sampler))


@dataclass
class Schedule:
    label: str
    method: Method
    plan: SamplingPlan
    style: dict


def schedules() -> list[Schedule]:
    """The sampler grids of the presets (DDPM at its paper length; 100 steps lie on the same curve).

    Curves that coincide (tutorial and uniform flow; EDM and flow on the EDM grid) are told apart
    by their markers and line styles.
    """
    tutorial, ddpm, cosine = method("tutorial"), method("ddpm"), method("ddpm-cosine")
    flow, edm = method("flow"), method("edm")
    dots = {"marker": "o", "markersize": 3.5}
    return [
        Schedule(
            "tutorial: 16 levels",
            tutorial,
            plan(tutorial),
            {"color": "C0", "marker": "s", "markersize": 7, "linewidth": 3, "alpha": 0.55},
        ),
        Schedule("DDPM linear: 1000 steps", ddpm, plan(ddpm, steps=1000), {"color": "C1"}),
        Schedule("DDPM cosine: 1000 steps", cosine, plan(cosine, steps=1000), {"color": "C2"}),
        Schedule(
            "flow: Heun 18, uniform t",
            flow,
            plan(flow, name="heun", steps=18),
            {"color": "C3", "linestyle": "--", **dots},
        ),
        Schedule(
            "flow: Heun 18, EDM grid (flow-cpu)",
            flow,
            plan(flow, name="heun", steps=18, grid="edm"),
            {"color": "C4", "linestyle": "--", **dots},
        ),
        Schedule(
            "EDM: Heun 18, rho = 7",
            edm,
            plan(edm, name="edm", steps=18),
            {"color": "C5", "marker": "D", "markersize": 7, "linewidth": 3, "alpha": 0.45},
        ),
    ]


# --------------------------------------------------------------------------- drawing helpers


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def show_image(axes: Axes, image: Tensor) -> None:
    """One [3, H, W] image in the model range, clipped to [-1, 1] (never min-max stretched)."""
    axes.imshow(to_uint8(image).permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


def load_cars(data: Path) -> Tensor:
    """The CARS images as float [N, 3, 32, 32] in [-1, 1] (read in place, never copied)."""
    images = [np.asarray(Image.open(data / name).convert("RGB")) for name in CARS]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 127.5 - 1.0


# --------------------------------------------------------------------------- schedules.png


def figure_schedules(out: Path) -> None:
    figure = new_figure(12.0, 8.0)
    panels = figure.subplots(2, 2).ravel()
    for s in schedules():
        grid = s.plan.grid
        alpha, sigma = s.method.process.alpha_sigma(grid)
        fraction = torch.arange(len(grid), dtype=torch.float64) / (len(grid) - 1)
        style = {"label": s.label, **s.style}
        log_snr = 2 * (alpha.log() - sigma.log())
        std = (alpha**2 * SIGMA_DATA**2 + sigma**2).sqrt()
        panels[0].plot(fraction, alpha, **style)
        positive = sigma > 0
        panels[1].plot(fraction[positive], sigma[positive], **style)
        finite = torch.isfinite(log_snr)
        panels[2].plot(fraction[finite], log_snr[finite], **style)
        panels[3].plot(fraction, std, **style)
    titles = [
        ("signal scale alpha", "alpha", False),
        ("noise scale sigma (log; the final sigma = 0 not drawn)", "sigma", True),
        ("log SNR = log(alpha^2 / sigma^2)  (the infinite ends not drawn)", "log SNR", False),
        (f"std of x_t for data of std {SIGMA_DATA} (EDM's starts at 80)", "std(x_t)", False),
    ]
    for axes, (title, ylabel, logy) in zip(panels, titles, strict=True):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("fraction of the sampler's trajectory (0 = start, pure noise)")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if logy:
            axes.set_yscale("log")
    panels[2].axhline(0.0, color="black", linewidth=0.6)
    panels[3].axhline(1.0, color="black", linewidth=0.6)
    panels[3].set_ylim(0.0, 1.3)
    panels[0].legend(fontsize=8, loc="upper left")
    figure.suptitle("Noise schedules of difflab's methods along their sampler grids")
    figure.tight_layout()
    save(figure, out / "schedules.png")


# --------------------------------------------------------------------------- forward-process.png


def level_label(name: str, process, t: float, alpha: float, sigma: float) -> str:
    if name == "tutorial":
        return f"level {int(process.level(torch.tensor(t)))}\nα={alpha:.2f} σ={sigma:.2f}"
    if name.startswith("ddpm"):
        step = round(t * process.num_timesteps)
        return f"step {step}\nα={alpha:.2f} σ={sigma:.2f}"
    if name == "edm":
        return f"σ={sigma:.3g}\nα=1"
    return f"t={t:.3f}\nα={alpha:.2f} σ={sigma:.2f}"


def figure_forward(out: Path, car: Tensor, eps: Tensor) -> None:
    rows = [
        ("tutorial", "tutorial (linear path,\n16 levels)"),
        ("ddpm", "DDPM linear\n(nearest step)"),
        ("ddpm-cosine", "DDPM cosine\n(nearest step)"),
        ("flow", "flow matching\n(linear path)"),
        ("edm", "EDM (VE)"),
    ]
    ratios = [(16 - k) / k for k in LEVELS]  # t / (1 - t) at t = 1 - k/16
    figure = new_figure(1.45 * (len(ratios) + 1) + 1.2, 1.75 * len(rows) + 0.9)
    cells = figure.subplots(len(rows), len(ratios) + 1, squeeze=False)
    for r, (name, label) in enumerate(rows):
        process = method(name).process
        show_image(cells[r, 0], car)
        cells[r, 0].set_ylabel(label, fontsize=9)
        if r == 0:
            cells[r, 0].set_title("clean x0", fontsize=9)
        for c, ratio in enumerate(ratios, start=1):
            t = process.t_from_ratio(torch.tensor([ratio], dtype=torch.float64))
            alpha, sigma = (float(v) for v in process.alpha_sigma(t))
            show_image(cells[r, c], alpha * car + sigma * eps)
            cells[r, c].set_xlabel(level_label(name, process, float(t), alpha, sigma), fontsize=8)
            if r == 0:
                log_snr = -2 * math.log(ratio) + 0.0  # no '-0.0'
                cells[r, c].set_title(f"σ/α = {ratio:.3g}\nlog SNR = {log_snr:.1f}", fontsize=9)
    figure.suptitle(
        "x_t = α x0 + σ ε at the same σ/α, the same ε for every method (clipped to [-1, 1])",
        fontsize=10,
    )
    figure.tight_layout()
    save(figure, out / "forward-process.png")


# --------------------------------------------------------------------------- tutorial pairs


def figure_tutorial_pairs(out: Path, car: Tensor, eps: Tensor) -> None:
    """The tutorial's forward_noise(x, k): img_a at level k, img_b at level k + 1, same noise."""
    path = TutorialPath(num_levels=16)
    time_bar = path.time_bar
    levels = (0, 3, 7, 11, 15)
    figure = new_figure(1.6 * len(levels) + 1.4, 6.4)
    cells = figure.subplots(3, len(levels), squeeze=False)
    names = [
        "img_a: level k\n(network input)",
        "img_b: level k+1\n(L1 target)",
        "16 (img_b - img_a)\n= x0 - ε",
    ]
    for c, k in enumerate(levels):
        a, b = float(time_bar[k]), float(time_bar[k + 1])
        img_a = (1 - a) * car + a * eps
        img_b = (1 - b) * car + b * eps
        for r, image in enumerate((img_a, img_b, 16 * (img_b - img_a))):
            show_image(cells[r, c], image)
        cells[0, c].set_title(f"k = {k}\nt_a = {a:.4g}, t_b = {b:.4g}", fontsize=9)
    for r, name in enumerate(names):
        cells[r, 0].set_ylabel(name, fontsize=9)
    figure.suptitle(
        "forward_noise: the target is the same image one level cleaner, from the same noise;\n"
        "the difference is (x0 - ε)/16 at every level (bottom row, shown x16)",
        fontsize=10,
    )
    figure.tight_layout()
    save(figure, out / "tutorial-forward-noise.png")


# --------------------------------------------------------------------------- detail-kept.png


class ExactGaussian(Denoiser):
    """The exact denoiser of x0 ~ N(0, diag(stds^2)) on the last axis, through each target.

    E[x0 | x_t] = g x_t with g = alpha s^2 / (alpha^2 s^2 + sigma^2), per component.
    """

    def __init__(self, m: Method, stds: Tensor) -> None:
        super().__init__(nn.Identity(), m.process, m.parameterization)
        self.var = stds.double() ** 2

    def raw(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        c = self.coefficients(times_like(t, x), x.ndim)
        alpha, sigma, x = c.alpha.double(), c.sigma.double(), x.double()
        x0 = alpha * self.var / (alpha**2 * self.var + sigma**2) * x
        eps = (x - alpha * x0) / sigma
        return self.parameterization.target(x0, eps, c).double()


class OrthogonalNoise:
    """Noise draws that make the sample variance of a linear sampler exact.

    A sampler driven by the exact Gaussian denoiser is linear: x = A z + sum_k B_k w_k for the
    starting noise z and the fresh draws w_k. Each draw here is a different column of a random
    orthogonal matrix (orthogonal to the constant vector too, scaled to sample variance 1), shared
    by every component, so the sample variance of x is A^2 + sum_k B_k^2 with no Monte-Carlo
    error, for at most ``num - 1`` draws.
    """

    def __init__(self, num: int, seed: int) -> None:
        matrix = torch.randn(num, num, generator=torch.Generator().manual_seed(seed)).double()
        matrix[:, 0] = 1.0
        q, _ = torch.linalg.qr(matrix)
        self.columns, self.used = q[:, 1:] * math.sqrt(num - 1), 0

    def randn(self, shape) -> Tensor:
        if self.used == self.columns.shape[1]:
            raise RuntimeError("OrthogonalNoise: more draws than orthogonal columns")
        column = self.columns[:, self.used]
        self.used += 1
        return column.reshape(-1, *([1] * len(shape))).expand(-1, *shape)


def kept_std(m: Method, p: SamplingPlan, stds: Tensor, num: int = 1024) -> Tensor:
    """std(sample) / s per component std s (exact: see ``OrthogonalNoise``)."""
    rng = OrthogonalNoise(num, NOISE_SEED)
    z = rng.randn((1, 1, len(stds)))
    scale = float(m.process.alpha_sigma(p.grid[:1])[1])  # as difflab.sampling.generate starts
    x = p(ExactGaussian(m, stds), z * scale, rng)
    return x.double().std(0).flatten() / stds


def dct_stds(data: Path, count: int = 1000) -> tuple[np.ndarray, float]:
    """Std of every orthonormal 2-D DCT coefficient (per channel) over ``count`` training cars,
    and the std of their pixels."""
    names = sorted((data / "automobile").iterdir())[:count]
    x = np.stack([np.asarray(Image.open(name).convert("RGB")) for name in names])
    x = x.astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1.0
    pixel_std = float(x.std())
    x -= x.mean(0)
    n = x.shape[-1]
    k = np.arange(n)
    basis = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    basis[0] /= np.sqrt(2.0)
    coefficients = basis @ x @ basis.T
    return coefficients.std(0).ravel(), pixel_std


def figure_detail(out: Path, data: Path) -> dict[str, Tensor]:
    stds = torch.logspace(-3, 0.3, 56, dtype=torch.float64)
    tutorial, ddpm, flow, edm = method("tutorial"), method("ddpm"), method("flow"), method("edm")
    runs = [
        ("tutorial loop, 16 levels (16 NFE)", tutorial, plan(tutorial)),
        ("flow Euler, 100 uniform steps (100 NFE)", flow, plan(flow, name="euler", steps=100)),
        ("flow Heun 18, uniform t (35 NFE)", flow, plan(flow, name="heun", steps=18)),
        ("flow Heun 18, EDM grid (35 NFE)", flow, plan(flow, name="heun", steps=18, grid="edm")),
        ("EDM Heun 18, rho = 7 (35 NFE)", edm, plan(edm, name="edm", steps=18)),
        ("DDPM ancestral, 100 steps", ddpm, plan(ddpm, name="ancestral", steps=100)),
        ("DDPM ancestral, 1000 steps", ddpm, plan(ddpm, name="ancestral", steps=1000)),
        ("DDIM eta = 0, 50 steps", ddpm, plan(ddpm, name="ddim", steps=50)),
    ]
    figure = new_figure(9.0, 5.6)
    axes = figure.add_subplot()
    spread, pixel_std = dct_stds(data)
    low, median, high = np.percentile(spread, [10, 50, 90])
    axes.axvspan(low, high, color="0.9", label="10-90% of car DCT-coefficient stds")
    axes.axvline(median, color="0.6", linestyle="--", linewidth=1, label="their median")
    results = {}
    for index, (label, m, p) in enumerate(runs):
        kept = kept_std(m, p, stds)
        results[label] = kept
        style = "-" if index < 5 else ("--" if "ancestral" in label else ":")
        axes.plot(stds, kept, style, color=f"C{index}", label=label, linewidth=1.8)
    axes.axhline(1.0, color="black", linewidth=0.6)
    axes.set_xscale("log")
    axes.set_xlabel("std s of a data component (pixel range [-1, 1])")
    axes.set_ylabel("std of the samples / s")
    axes.set_title(
        "Samplers with the exact denoiser of N(0, s^2): how much of a component's std survives",
        fontsize=10,
    )
    axes.set_ylim(0.0, 1.35)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save(figure, out / "detail-kept.png")
    results["_stds"] = stds
    results["_spread"] = torch.from_numpy(np.array([low, median, high, pixel_std]))
    return results


# --------------------------------------------------------------------------- main


def summary(cars: Tensor, detail: dict[str, Tensor]) -> None:
    """Numbers quoted in docs/methods.md."""
    print("\nnumbers for docs/methods.md")
    print(f"  std of the two cars' pixels in [-1, 1]: {float(cars.std()):.3f}")
    for s in schedules():
        alpha, sigma = s.method.process.alpha_sigma(s.plan.grid)
        log_snr = 2 * (alpha.log() - sigma.log())
        finite = log_snr[torch.isfinite(log_snr)]
        print(
            f"  {s.label:38s} {s.plan.num_steps:5d} steps, log SNR {float(finite.min()):7.2f} .. "
            f"{float(finite.max()):6.2f} (finite part), last sigma/alpha before 0: "
            f"{float(sigma[-2] / alpha[-2]):.4g}"
        )
    stds = detail["_stds"]
    low, median, high, pixel_std = detail["_spread"].tolist()
    print(f"  std of the pixels of the first 1000 cars: {pixel_std:.3f}")
    print(f"  car DCT-coefficient stds: 10% {low:.3f}, median {median:.3f}, 90% {high:.3f}")
    for label, kept in detail.items():
        if label.startswith("_"):
            continue
        at = [float(np.interp(math.log(s), stds.log().numpy(), kept.numpy())) for s in (0.03, 0.1)]
        print(f"  kept at s = 0.03 / 0.1: {at[0]:.2f} / {at[1]:.2f}   {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 image folder (train split)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out)

    cars = load_cars(data)
    eps = torch.randn(cars.shape[1:], generator=torch.Generator().manual_seed(NOISE_SEED)).double()
    figure_schedules(out)
    figure_forward(out, cars[0], eps)
    figure_tutorial_pairs(out, cars[1], eps)
    detail = figure_detail(out, data)
    summary(cars, detail)


if __name__ == "__main__":
    main()
