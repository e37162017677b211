"""Speed benchmarks on CPU: training and sampling images/s (issues 2 and 4).

    python bench/throughput.py [--quick] [--out docs/benchmarks.md] [--wait-idle MINUTES]
    python bench/throughput.py --profile    # top operators of one bare and one difflab step
    python bench/throughput.py --render     # rewrite the Markdown from the JSON

1. The tutorial network at batch 128: a bare PyTorch loop written like the tutorial's notebook
   against difflab's own ``Trainer._train_step`` on the same synthetic data (the trainer overhead),
   the tutorial's 16-step sampling loop against ``difflab.sampling.generate``, achieved GFLOP/s
   and the fraction of the machine's measured float32 matmul peak.
2. Every network at its CPU-preset batch size, with and without ``channels_last`` and
   ``torch.compile`` (failures are reported with the first line of their error).

Results replace the ``## Speed`` section of ``--out`` (other sections are kept) and are copied as
JSON to ``bench/results/throughput.json``. Synthetic random images are used: speed does not
depend on pixel values, and no download is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.config import apply_overrides, load_preset
from difflab.data import ImageSet
from difflab.models import count_parameters, forward_gflops
from difflab.registry import build_network
from difflab.sampling import derive_seed, generate, image_seeds
from difflab.train.ema import update_ema
from difflab.train.schedule import ema_beta
from difflab.train.trainer import Trainer, images_before

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "bench" / "results" / "throughput.json"
HEADING = "## Speed"
DOC_TITLE = "# Benchmarks"

NUM_IMAGES, IMAGE_SIZE, CHANNELS = 5_000, 32, 3
TUTORIAL_BATCH, NUM_LEVELS, TUTORIAL_LR = 128, 16, 8e-4
ISSUE_IMAGES_PER_S, ISSUE_TRAIN_GFLOP = 18.0, 5.4  # issue 2: the notebook on a 2-core machine
BACKWARD_FACTOR = 3.0  # forward + backward ~ 3 forwards (backward ~ 2: grads of inputs and weights)
BUSY_LOAD = 1.5  # 1-minute load average above which other jobs probably shared the CPU
BUSY_OTHERS = 0.2  # cores used by other processes, on average, above which a run counts as busy
IDLE_CORES = 0.1  # --wait-idle waits until other processes use fewer cores than this
MATMUL_SIZE = 2048

# (label, preset, overrides): the networks of issue 4 at their CPU-preset batch sizes.
NETWORKS: list[tuple[str, str, list[str]]] = [
    ("tutorial", "tutorial", []),
    ("tutorial-keras", "tutorial-keras", []),
    ("unet (edm-cpu)", "edm-cpu", []),
    ("unet (edm-paper, 35.7M)", "edm-paper", ["train.batch_size=8"]),
]
VARIANTS: list[tuple[str, list[str]]] = [
    ("eager", []),
    ("channels_last", ["train.channels_last=true"]),
    ("compile", ["train.compile=true"]),
    ("compile + channels_last", ["train.compile=true", "train.channels_last=true"]),
]
# Pictures, checkpoints and log rows off: only the optimizer step is timed.
QUIET = [
    "train.device=cpu",
    "train.sample_every_kimg=0",
    "train.checkpoint_every=1000000000",
    "train.log_every=1000000000",
]


@dataclass(frozen=True)
class Plan:
    """How many repetitions each measurement gets."""

    warmup: int  # untimed steps before timing (the first also compiles)
    steps: int  # timed steps per loop in the tutorial comparison
    sample_reps: int  # timed 16-step sampling runs of a full batch, per loop
    matmul_reps: int
    variant_seconds: float  # target timed seconds per (network, variant)
    variant_min: int  # timed steps per (network, variant), at least ...
    variant_max: int  # ... and at most


FULL = Plan(
    warmup=3,
    steps=6,
    sample_reps=2,
    matmul_reps=10,
    variant_seconds=25,
    variant_min=3,
    variant_max=8,
)
QUICK = Plan(
    warmup=1,
    steps=2,
    sample_reps=1,
    matmul_reps=5,
    variant_seconds=5,
    variant_min=1,
    variant_max=2,
)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass(frozen=True)
class CpuClock:
    """CPU seconds at one moment: the machine's busy time and this process's own share."""

    wall: float
    busy: float  # all processes (user + nice + system + irq + softirq)
    own: float  # this process and its finished children (the compiler)
    steal: float  # taken by the hypervisor for other virtual machines

    @classmethod
    def now(cls) -> CpuClock:
        tick = os.sysconf("SC_CLK_TCK")
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        except (OSError, ValueError):
            fields = [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        own = sum(
            usage.ru_utime + usage.ru_stime
            for usage in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        busy = (user + nice + system + irq + softirq) / tick
        return cls(time.monotonic(), busy, own, steal / tick)


def others_since(start: CpuClock) -> dict[str, float]:
    """Cores that other processes (and other VMs: steal) kept busy on average since ``start``.

    The load average cannot tell: it counts this benchmark's own threads too.
    """
    end = CpuClock.now()
    wall = max(end.wall - start.wall, 1e-9)
    others = max((end.busy - start.busy) - (end.own - start.own), 0.0)
    return {
        "other_cores": round(others / wall, 3),
        "steal_cores": round((end.steal - start.steal) / wall, 3),
        "seconds": round(wall, 1),
    }


def machine_info(argv: list[str]) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", *argv]),
        "load_start": load_average(),
    }


def matmul_peak(reps: int, size: int = MATMUL_SIZE) -> float:
    """Best GFLOP/s of a float32 ``torch.mm`` (2 n^3 FLOP) at the default thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm up
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * size**3 / best / 1e9


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summarize(seconds: list[float], images: list[int]) -> dict[str, Any]:
    """Images/s from the median step (robust to other jobs' bursts) and from the total."""
    rates = [n / s for n, s in zip(images, seconds, strict=True)]
    return {
        "images_per_s": statistics.median(rates),
        "images_per_s_mean": sum(images) / sum(seconds),
        "median_step_s": statistics.median(seconds),
        "steps": len(seconds),
        "step_s": [round(s, 4) for s in seconds],
    }


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# --------------------------------------------------------------------------- data


def synthetic_images(count: int = NUM_IMAGES, seed: int = 0) -> ImageSet:
    """``count`` random uint8 32x32 RGB images (one class)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (count, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return ImageSet(images, torch.zeros(count, dtype=torch.int64), [], f"synthetic ({count})")


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


@contextlib.contextmanager
def trainer_for(preset: str, data: ImageSet, overrides: list[str]) -> Iterator[Trainer]:
    """A ``Trainer`` on a temporary run directory, released (lock, log, dynamo) afterwards."""
    config = apply_overrides(load_preset(preset), [*QUIET, *overrides])
    with tempfile.TemporaryDirectory(prefix="difflab-bench-") as folder:
        trainer = Trainer(config, Path(folder) / "run", data=data, progress=False)
        try:
            yield trainer
        finally:
            if trainer.lock is not None:
                trainer.lock.__exit__()
            trainer.logbook.close()
            if config.train.compile:
                torch._dynamo.reset()


def trainer_step(trainer: Trainer) -> int:
    """What ``Trainer.run`` does per step, less logging and pictures; returns the batch size."""
    trainer._train_step()
    batch = images_before(trainer.step + 1, len(trainer.images), trainer.config)
    batch -= trainer.images_seen
    trainer.step += 1
    trainer.images_seen += batch
    if trainer.ema is not None:
        beta = ema_beta(batch, trainer.images_seen, trainer.config.train)
        update_ema(trainer.ema, trainer.net, beta)
    return batch


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
            start = time.perf_counter()
            sizes[name].append(steps[name]())
            times[name].append(time.perf_counter() - start)
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
    with trainer_for("tutorial", data, []) as trainer:
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


# --------------------------------------------------------------------------- issue 4


def warm_up(trainer: Trainer, plan: Plan) -> dict[str, Any]:
    """The first step (which compiles, if asked) timed apart, then the warm-up steps."""
    first = timed(lambda: trainer_step(trainer))
    warm = [timed(lambda: trainer_step(trainer)) for _ in range(max(plan.warmup - 1, 1))]
    return {"first_step_s": first, "warm_step_s": warm}


def start_variants(
    stack: contextlib.ExitStack, preset: str, overrides: list[str], data: ImageSet, plan: Plan
) -> tuple[dict[str, Trainer], dict[str, dict[str, Any]]]:
    """A warmed-up trainer per variant that works; a failure record per variant that does not."""
    live, results = {}, {}
    for name, extra in VARIANTS:
        try:
            trainer = stack.enter_context(trainer_for(preset, data, [*overrides, *extra]))
            results[name] = {"status": "ok", **warm_up(trainer, plan)}
            live[name] = trainer
        except Exception as error:  # compile on CPU can fail in many ways; report, go on
            results[name] = {"status": "failed", "error": first_line(error)}
    return live, results


def round_robin(live: dict[str, Trainer], warm: dict[str, dict], plan: Plan) -> dict[str, dict]:
    """Timed steps of all variants in turn (rotating order): drifting load hits each alike."""
    fastest = [warm[name]["warm_step_s"][-1] for name in live]
    count = round(plan.variant_seconds / max(statistics.median(fastest), 1e-3)) if live else 0
    count = min(max(count, plan.variant_min), plan.variant_max)
    names = list(live)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    sizes: dict[str, list[int]] = {name: [] for name in names}
    for k in range(count):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            sizes[name].append(trainer_step(live[name]))
            seconds[name].append(time.perf_counter() - start)
    return {name: summarize(seconds[name], sizes[name]) for name in names}


def measure_network(preset: str, overrides: list[str], data: ImageSet, plan: Plan) -> dict:
    with contextlib.ExitStack() as stack:
        live, results = start_variants(stack, preset, overrides, data, plan)
        for name, timing in round_robin(live, results, plan).items():
            results[name].update(timing)
            first = results[name]["first_step_s"]
            results[name]["compile_s"] = max(first - timing["median_step_s"], 0.0)
    return results


def network_facts(preset: str, overrides: list[str]) -> dict[str, Any]:
    config = apply_overrides(load_preset(preset), overrides)
    net = build_network(config)
    return {
        "preset": preset,
        "batch_size": config.train.batch_size,
        "parameters": count_parameters(net),
        "forward_gflop_per_image": forward_gflops(net, CHANNELS, IMAGE_SIZE),
    }


def networks_benchmark(data: ImageSet, plan: Plan, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for label, preset, overrides in NETWORKS:
        log(f"  {label}: {', '.join(name for name, _ in VARIANTS)}")
        clock = CpuClock.now()
        variants = measure_network(preset, overrides, data, plan)
        others = others_since(clock)
        log("    " + "; ".join(f"{k}: {describe_variant(v)}" for k, v in variants.items()))
        log(f"    others {others}")
        facts = network_facts(preset, overrides)
        rows.append({"network": label, **facts, "variants": variants, "others": others})
    return rows


# --------------------------------------------------------------------------- profile


def profile_tutorial(data: ImageSet, rows: int = 20) -> str:
    """Top operators of one bare step and one trainer step (for finding where time goes)."""
    from torch.profiler import ProfilerActivity, profile

    bare = BareLoop(data)
    out = []
    with trainer_for("tutorial", data, []) as trainer:
        bare.step()
        trainer_step(trainer)
        for name, step in (("bare", bare.step), ("difflab", lambda: trainer_step(trainer))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            out.append(f"== {name} step ==\n{table}")
    return "\n".join(out)


# --------------------------------------------------------------------------- Markdown


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def describe_variant(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"failed ({result['error']})"
    return f"{fmt(result['images_per_s'])} img/s"


def busy_reasons(results: dict[str, Any]) -> list[str]:
    machine, reasons = results["machine"], []
    if machine["load_start"] > BUSY_LOAD:
        reasons.append(f"load average {machine['load_start']} at start")
    for part, use in results["others"].items():
        if busy_cores(use) > BUSY_OTHERS:
            reasons.append(
                f"other processes used {busy_cores(use):.2f} cores during the {part} part"
            )
    return reasons


def busy_warning(reasons: list[str]) -> str:
    return (
        f"> **Warning: the machine was busy** ({'; '.join(reasons)}): other jobs shared the 2 "
        "cores, so the absolute numbers are low and noisy. Compared loops ran interleaved, so "
        "the comparisons between them hold better than the absolute numbers.\n"
    )


def others_text(others: dict[str, dict[str, float]]) -> str:
    return ", ".join(
        f"{use['other_cores']:.2f} cores ({use['steal_cores']:.2f} steal) during the {part} part"
        for part, use in others.items()
    )


def machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    lines = [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable), torch {machine['torch']} on CPU with "
        f"{machine['torch_threads']} threads, Python {machine['python']}",
        f"- Date: {machine['date']}; command: `{machine['command']}`",
        f"- 1-minute load average: {machine['load_start']} at start, {machine['load_end']} at "
        "end (the end value includes this benchmark's own 2 threads)",
        f"- Other processes kept busy on average: {others_text(results['others'])} "
        "(`/proc/stat` busy time minus this process's CPU time)",
        f"- Float32 matmul peak ({MATMUL_SIZE}x{MATMUL_SIZE} `torch.mm`, best of "
        f"{machine['matmul_reps']}): {fmt(machine['peak_gflops'])} GFLOP/s "
        f"(start {fmt(machine['peak_start'])}, end {fmt(machine['peak_end'])})",
    ]
    reasons = busy_reasons(results)
    return [busy_warning(reasons), *lines] if reasons else lines


def tutorial_markdown(t: dict[str, Any]) -> list[str]:
    tr, sa, fl = t["training"], t["sampling"], t["flops"]
    overhead = t["trainer_overhead"]
    verdict = "under" if overhead < 0.05 else "**above**"
    rows = [
        "| loop | training img/s | step (s) | sampling img/s (16 steps) "
        f"| batch of {t['batch_size']} (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("bare", "bare PyTorch loop (the notebook)"), ("difflab", "difflab")):
        rows.append(
            f"| {label} | {fmt(tr[name]['images_per_s'])} | {fmt(tr[name]['median_step_s'], 2)} "
            f"| {fmt(sa[name]['images_per_s'])} | {fmt(sa[name]['median_step_s'], 1)} |"
        )
    return [
        f"### Tutorial network, batch {t['batch_size']}, CPU (issue 2)",
        "",
        f"`tutorial` preset: {t['parameters']:,} parameters, L1 next-step objective, Adam 8e-4, "
        f"{NUM_IMAGES:,} synthetic 32x32 images. Medians over {tr['bare']['steps']} training "
        f"steps and {sa['bare']['steps']} sampling runs per loop, bare and difflab interleaved.",
        "",
        *rows,
        "",
        f"- **Trainer overhead** (1 - difflab / bare, median steps): **{overhead:+.1%}**, "
        f"{verdict} the 5% target (from total times: {t['trainer_overhead_mean']:+.1%}).",
        f"- Issue 2's reference: about {ISSUE_IMAGES_PER_S:g} training img/s for the notebook on "
        f"a 2-core machine; difflab here: {fmt(tr['difflab']['images_per_s'])} img/s.",
        f"- FLOPs: one forward pass costs {fl['forward_gflop_per_image']:.2f} GFLOP per image "
        f"(`forward_gflops`); assuming forward + backward = {BACKWARD_FACTOR:g} forwards, a "
        f"training image costs {fl['train_gflop_per_image']:.2f} GFLOP (the issue says "
        f"{ISSUE_TRAIN_GFLOP:g}).",
        f"- Achieved: {fmt(fl['achieved_gflops'])} GFLOP/s by difflab "
        f"({fmt(t['bare_achieved_gflops'])} by the bare loop), **{fl['fraction_of_peak']:.0%} "
        f"of the measured matmul peak** ({t['bare_fraction_of_peak']:.0%} for the bare loop).",
        "",
    ]


def variant_cell(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"failed: `{result['error'][:80]}`"
    return fmt(result["images_per_s"])


def compile_cell(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return "failed"
    return fmt(result["compile_s"], 0)


def busy_cores(use: dict[str, float]) -> float:
    return use["other_cores"] + use["steal_cores"]


def others_cell(use: dict[str, float]) -> str:
    cores = busy_cores(use)
    return f"**{cores:.2f} (busy)**" if cores > BUSY_OTHERS else f"{cores:.2f}"


def speed_table(rows: list[dict[str, Any]]) -> list[str]:
    names = [name for name, _ in VARIANTS]
    lines = [
        "| network | params | fwd GFLOP/img | batch | " + " | ".join(names) + " | others |",
        "|---|---:|---:|---:|" + "---:|" * len(names) + "---:|",
    ]
    for row in rows:
        cells = [variant_cell(row["variants"][name]) for name in names]
        lines.append(
            f"| {row['network']} | {row['parameters'] / 1e6:.2f}M | "
            f"{row['forward_gflop_per_image']:.2f} | {row['batch_size']} | "
            + " | ".join([*cells, others_cell(row["others"])])
            + " |"
        )
    return lines


def compile_table(rows: list[dict[str, Any]]) -> list[str]:
    compiled = [name for name, _ in VARIANTS if "compile" in name]
    lines = ["| network | " + " | ".join(compiled) + " |", "|---|" + "---:|" * len(compiled)]
    for row in rows:
        cells = [compile_cell(row["variants"][name]) for name in compiled]
        lines.append(f"| {row['network']} | " + " | ".join(cells) + " |")
    return lines


def networks_markdown(rows: list[dict[str, Any]]) -> list[str]:
    return [
        "### Every network, training on CPU (issue 4)",
        "",
        "Training images/s of difflab's trainer step (forward, backward, Adam, EMA where the "
        "preset has one) at each preset's batch size; medians over the timed steps. *others*: "
        "cores that other processes kept busy, on average, while the row was measured; even "
        "one busy core slows a 2-thread step several times, so a busy row is not comparable "
        "with the others.",
        "",
        *speed_table(rows),
        "",
        "Compile time (s): first step minus a normal step.",
        "",
        *compile_table(rows),
        "",
    ]


def method_lines() -> list[str]:
    return [
        "### How this was measured",
        "",
        "- `bench/throughput.py`; raw step times in `bench/results/throughput.json`.",
        f"- The bare loop is the notebook's code: random batch of {TUTORIAL_BATCH} from a float "
        "tensor, one "
        "noise tensor, img_a and img_b at levels t and t+1 of `1 - linspace(0, 1, 17)`, L1 "
        "loss, Adam, `zero_grad / backward / step`. difflab's step is `Trainer._train_step` "
        "(plus the loop's EMA update, none for the tutorial); logging, pictures and "
        "checkpoints are not timed.",
        "- Sampling: the bare loop runs `x = model(x, i)` for i = 0..15 under `no_grad`; "
        "difflab runs `difflab.sampling.generate` with the tutorial sampler (as `Run.sample`).",
        "- Images/s come from the median step, which is robust to bursts of other jobs; the "
        "JSON also has the rate from total time.",
        "- `torch.compile` uses the default inductor backend with a fresh cache directory, so "
        "compile times are cold; *compile + channels_last* compiles right after *compile* on "
        "the same network and reuses part of its work. edm-paper's preset batch (128) is meant "
        "for a GPU; it runs at 8 here.",
        "",
    ]


def speed_section(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        HEADING,
        "",
        f"_Written by `bench/throughput.py` ({machine['date']}); rerun it to update this section._",
        "",
        *machine_lines(results),
        "",
    ]
    if "tutorial" in results:
        lines += tutorial_markdown(results["tutorial"])
    if "networks" in results:
        lines += networks_markdown(results["networks"])
    if "tutorial" in results and "networks" in results:
        lines += noise_lines(results["tutorial"], results["networks"])
    return "\n".join([*lines, *method_lines()])


def noise_lines(tutorial: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The same configuration measured twice: a yardstick for differences between cells."""
    row = next((r for r in rows if r["preset"] == "tutorial"), None)
    if row is None or row["variants"]["eager"]["status"] != "ok":
        return []
    first = tutorial["training"]["difflab"]["images_per_s"]
    second = row["variants"]["eager"]["images_per_s"]
    return [
        f"Measurement noise: the tutorial's *eager* cell and the difflab row of the issue 2 "
        f"table are the same configuration, measured minutes apart: {fmt(second)} vs "
        f"{fmt(first)} img/s ({second / first - 1:+.0%}). Differences of that size between "
        "cells are not significant.",
        "",
    ]


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the ``heading`` section (up to the next ``## ``) replaced by ``body``."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + body + ("\n" + rest if rest else "")


def write_markdown(path: Path, section: str) -> None:
    if path.exists():
        text = path.read_text()
    else:
        text = f"{DOC_TITLE}\n\nSpeed and sample quality of difflab, one `##` section each.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, HEADING, section.rstrip("\n") + "\n"))


def write_json(results: dict[str, Any]) -> None:
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--skip-networks", action="store_true", help="only the tutorial part")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help=f"first wait up to MINUTES until other processes use under {IDLE_CORES} cores",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the top operators of one step and exit"
    )
    parser.add_argument(
        "--render", action="store_true", help=f"only rewrite --out from {JSON_PATH.name}"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {message}", flush=True)


def wait_for_idle(minutes: float, window_s: float = 20.0) -> float:
    """Wait until other processes use under ``IDLE_CORES`` over a window; seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < minutes * 60:
        clock = CpuClock.now()
        time.sleep(window_s)
        if others_since(clock)["other_cores"] < IDLE_CORES:
            break
    return time.monotonic() - start


def start_machine(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    if args.wait_idle > 0:
        log(f"waiting up to {args.wait_idle:g} min for other processes to go quiet")
    waited = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else 0.0
    machine = {**machine_info(argv), "waited_for_idle_s": round(waited)}
    log(f"start: {machine['cpu']}, torch {machine['torch']}, {machine['torch_threads']} threads")
    return machine


def finish_machine(results: dict[str, Any], peak_start: float, reps: int) -> None:
    peak_end = matmul_peak(reps)
    peak = max(peak_start, peak_end)
    results["machine"].update(
        load_end=load_average(),
        peak_start=peak_start,
        peak_end=peak_end,
        peak_gflops=peak,
        matmul_reps=reps,
    )
    refresh_fractions(results["tutorial"], peak)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    results: dict[str, Any] = {"machine": start_machine(args, argv), "plan": asdict(plan)}
    results["others"] = others = {}
    clock = CpuClock.now()
    peak_start = matmul_peak(plan.matmul_reps)
    log(f"matmul peak {peak_start:.1f} GFLOP/s")
    data = synthetic_images()
    log("issue 2: tutorial network, bare loop vs difflab")
    results["tutorial"] = tutorial_benchmark(data, plan, peak_start)
    others["tutorial"] = others_since(clock)
    log(f"  overhead {results['tutorial']['trainer_overhead']:+.1%}; others {others['tutorial']}")
    if not args.skip_networks:
        clock = CpuClock.now()
        log("issue 4: every network")
        results["networks"] = networks_benchmark(data, plan, log)
        others["networks"] = others_since(clock)
        log(f"  others {others['networks']}")
    finish_machine(results, peak_start, plan.matmul_reps)
    return results


def refresh_fractions(t: dict[str, Any], peak: float) -> None:
    """Fractions of the better of the two peak measurements."""
    t["flops"]["fraction_of_peak"] = t["flops"]["achieved_gflops"] / peak
    t["bare_fraction_of_peak"] = t["bare_achieved_gflops"] / peak


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = parse_args(argv[1:])
    if args.profile:
        print(profile_tutorial(synthetic_images()))
        return 0
    if args.render:
        write_markdown(args.out, speed_section(json.loads(JSON_PATH.read_text())))
        log(f"wrote {args.out} from {JSON_PATH}")
        return 0
    with tempfile.TemporaryDirectory(prefix="difflab-inductor-") as cache:
        # Cold compiles that leave nothing behind (importing difflab already set the default).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        results = run(args, argv)
    write_json(results)
    write_markdown(args.out, speed_section(results))
    log(f"wrote {args.out} and {JSON_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
