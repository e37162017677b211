"""The Python API: load a run directory (or an exported file) and sample from it.

run = difflab.load_run("runs/cars")
images = run.sample(16, seed=0)          # float, about [-1, 1], [16, 3, 32, 32]
difflab.save_grid(images, "cars.png")
horses = difflab.load_run("runs/cifar").sample(16, label="horse", guidance=2.0)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from difflab.classes import LabelRequest, bind_request
from difflab.config import Config, SamplerConfig, TrainConfig, check_limits, replace_checked
from difflab.denoisers import Denoiser
from difflab.devices import resolve_device
from difflab.errors import DifflabError
from difflab.io import atomic_write, check_output_file
from difflab.limits import (
    MAX_IMAGES,
    MAX_SAMPLE_BATCH,
    MAX_SAMPLER_STEPS,
    MAX_STEPS,
    Limits,
    limits_of,
)
from difflab.plans import SAMPLERS, SamplingPlan, build_sampler
from difflab.registry import Method, build_method, build_network
from difflab.samplers import StepCallback
from difflab.sampling import Generated, device_of, generate
from difflab.seeds import image_seeds
from difflab.train.checkpoint import GUIDE_PREFIX, load_model
from difflab.train.guides import check_weaker, model_guide


@dataclass(repr=False)
class Run:
    """A trained model ready to sample: its config, method and (EMA) network, on the device of
    its weights (``load_run(device=...)``, ``run.to(device)``)."""

    config: Config
    method: Method
    net: nn.Module
    source: Path
    step: int
    guide: nn.Module | None = None  # autoguidance: a weaker model of the same method
    weights: str = "ema"  # which of the checkpoint's weights net holds: "ema" or "raw"
    guide_named: bool = False  # the guide is one load_run(guide=...) named, not the run's own

    def __repr__(self) -> str:
        return (
            f"Run({str(self.source)!r}, method={self.method.name!r}, step={self.step}, "
            f"weights={self.weights!r}, device={str(self.device)!r}, "
            f"image_shape={self.image_shape}, classes={len(self.class_names)}, "
            f"guided={self.guide is not None})"
        )

    @property
    def device(self) -> torch.device:
        """Where the network's weights are, and so where it samples."""
        return device_of(self.net)

    def to(self, device: str | torch.device) -> Run:
        """The network (and its guide) moved to ``device`` ("cpu", "cuda", "cuda:1", "auto")."""
        target = resolve_device(str(device))
        self.net.to(target)
        if self.guide is not None:
            self.guide.to(target)
        return self

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images it makes."""
        return (3, self.config.data.image_size, self.config.data.image_size)

    @property
    def denoiser(self) -> Denoiser:
        """The network as its method's denoiser: ``run.denoiser(x, t)`` gives (x0, eps)."""
        return self.method.denoiser(self.net)

    @property
    def samplers(self) -> list[str]:
        """The names of the samplers this run's method can use (``run.plan(name)``)."""
        return [name for name, spec in SAMPLERS.items() if spec.requires(self.method)]

    def plan(self, sampler: str | None = None, steps: int | None = None, **options) -> SamplingPlan:
        """The run's sampler, or another compatible one by name with its own defaults.

        ``options`` are any ``SamplerConfig`` fields (eta, grid, rho, s_churn, clip_x0, ...).
        """
        if sampler is not None and not isinstance(sampler, str):
            raise DifflabError(f"sampler must be a sampler's name, got {sampler!r}")
        known = {item.name for item in dataclasses.fields(SamplerConfig)} - NOT_PLAN_OPTIONS
        unknown = sorted(set(options) - known - NOT_PLAN_OPTIONS)
        if unknown:
            raise DifflabError(
                f"unknown plan option {unknown[0]!r}; known options: {', '.join(sorted(known))}"
            )
        elsewhere = sorted(set(options) & NOT_PLAN_OPTIONS)
        if elsewhere:
            raise DifflabError(
                f"{', '.join(elsewhere)}: not a plan's option; the sampler is plan()'s first "
                "argument, guidance generate()'s, a guide load_run()'s"
            )
        config = self.config.sampler if sampler is None else SamplerConfig(name=sampler)
        if steps is not None:  # 0 in a config is the method's default; asked for, at least 1
            _check_count(steps, "steps", STEPS)
            options["steps"] = steps
        config = replace_checked(config, "sampler.", **options)
        check_limits(config, "sampler.")
        return build_sampler(self.method, config)

    @property
    def class_names(self) -> list[str]:
        """The classes a conditional run learned ([] for an unconditional one)."""
        return self.config.data.class_names

    def generate(
        self,
        num: int,
        seed: int = 0,
        *,
        label: LabelRequest = None,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        plan: SamplingPlan | None = None,
        batch_size: int = 64,
        start: int = 0,
        record: bool | int = False,
        progress: bool = False,
        on_step: StepCallback | None = None,
    ) -> Generated:
        """Images ``start .. start + num - 1`` of the sequence that ``seed`` defines.

        ``label``: a class name or index, one per image, or "all" (image i asks for class
        i mod C); None samples without a class. ``guidance``: the guidance weight w (the run's
        own by default; 1 = the plain model): away from the guide when the run has one
        (autoguidance), else classifier-free towards the label. ``record``: keep every step of
        the first ``record`` images (True: all) as uint8 pictures in ``.frames``; ``on_step(i, x,
        x0)``: see each step's state and x0 estimate, batch after batch (``sampling.generate``).
        """
        for value, name, limits in ((num, "num", NUM), (batch_size, "batch_size", BATCH),
                                    (start, "start", START), (seed, "seed", SEED)):  # fmt: skip
            _check_count(value, name, limits)
        if plan is not None and not isinstance(plan, SamplingPlan):
            raise DifflabError(f"plan must be a run.plan(...), got {plan!r}")
        if not isinstance(record, int) or record < 0:  # a bool is an int
            raise DifflabError(f"record must be True, False or a number of images, got {record!r}")
        if plan is not None and (sampler is not None or steps is not None):
            raise DifflabError("give plan= or sampler= and steps=, not both (a plan has its own)")
        if plan is not None and not plan.fits(self.method):
            raise DifflabError(
                f"this plan was built for another run ({plan.method} method): "
                "build it with this run's plan()"
            )
        plan = plan or self.plan(sampler, steps)
        recorded = min(num, num if record is True else record)
        size = recorded * (plan.num_steps + 1) * math.prod(self.image_shape) * 4  # float32 frames
        if size > MAX_RECORD_BYTES:
            raise DifflabError(
                f"record={record!r} keeps every step of {recorded:,} images: {size / 1e9:.0f} GB; "
                f"record fewer (record=16 keeps 16 images' steps), or fewer steps"
            )
        _check_bool(progress, "progress")
        guide = None if self.guide is None else self.method.denoiser(self.guide)
        labels, guidance = bind_request(
            label, guidance, self.class_names, num, start, self.config.sampler.guidance,
            guided=guide is not None,
        )  # fmt: skip
        return generate(
            self.denoiser,
            plan,
            self.image_shape,
            image_seeds(seed, start, num),
            batch_size=batch_size,
            labels=labels,
            guidance=guidance,
            guide=guide,
            record=record,
            progress=progress,
            on_step=on_step,
        )

    def sample(self, num: int = 16, seed: int = 0, **options) -> Tensor:
        """``num`` images, float32 [num, 3, H, W] on the CPU, about [-1, 1] and not clipped
        (``save_grid`` clips; ``(x + 1) / 2`` is [0, 1]): ``generate(num, seed, ...).images``.

        ``options``: generate()'s ``label``, ``guidance``, ``sampler``, ``steps``, ``plan``,
        ``batch_size``, ``start``, ``progress``, ``on_step``; sampler options through
        ``plan=run.plan(rho=10, ...)``. ``run.sample(16, label="horse", guidance=2.0)``.
        """
        known = set(inspect.signature(self.generate).parameters) - {"record"}
        unknown = sorted(set(options) - known)
        if unknown:
            name = unknown[0]
            hint = _HINTS.get(name) or next(
                (f"did you mean {m}=?" for m in difflib.get_close_matches(name, known, 1)),
                "sampler options go in plan=run.plan(...), the rest are generate()'s",
            )
            raise DifflabError(f"unknown option {name}; {hint}")
        return self.generate(num, seed, **options).images

    def export(self, path: str | Path) -> Path:
        """Write the weights (with the run's own guide), config and step to one .safetensors
        file that ``load_run`` and ``difflab sample`` read; returns its path."""
        out = check_output_file(_check_path(path, "path"), "path", (".safetensors",), "the export")
        if self.guide_named:  # its config's guide_at would not describe it
            raise DifflabError(
                "an export carries only a run's own guide, and this one was named by "
                "load_run(guide=...): load the run without guide= to export it"
            )
        weights = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        if self.guide is not None:  # the run's own guide travels with it (autoguidance)
            guide = self.guide.state_dict().items()
            weights.update({GUIDE_PREFIX + k: v.detach().cpu().contiguous() for k, v in guide})
        metadata = {
            "config": self.config.to_json(),
            "step": str(self.step),
            "weights": self.weights,
        }
        return atomic_write(out, lambda tmp: save_file(weights, str(tmp), metadata=metadata))


#: Names users reach for, and where those options are.
_HINTS = {
    "n": "the number of images is num (the first argument)",
    "num_images": "the number of images is num (the first argument)",
    "labels": "the class is label= (a name, an index, one per image, or 'all')",
    "num_steps": "did you mean steps=?",
    "device": "the device is load_run(device=...)'s, or run.to(device)",
    "record": "sample() returns the images only: generate(record=...) keeps the steps",
}


#: SamplerConfig fields that are not the plan's: its name (plan()'s sampler), guidance
#: (generate()'s) and the run's own guide (guide_at, fixed in training).
NOT_PLAN_OPTIONS = frozenset({"name", "guidance", "guide_at"})
MAX_RECORD_BYTES = 8e9  # what generate(record=...) may keep of the reverse process (host memory)
STEPS = Limits(low=1, high=MAX_SAMPLER_STEPS, integer=True)
NUM = Limits(low=1, high=MAX_IMAGES, integer=True)
BATCH = Limits(low=1, high=MAX_SAMPLE_BATCH, integer=True)
START = Limits(low=0, high=MAX_STEPS, integer=True)
SEED = limits_of(TrainConfig, "seed")  # the command line's --seed


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise DifflabError(f"{name} must be True or False, got {value!r}")
    return value


def _check_path(value: object, name: str) -> Path:
    if not isinstance(value, str | os.PathLike) or isinstance(value, bytes):
        raise DifflabError(f"{name} must be a path (a str or pathlib.Path), got {value!r}")
    return Path(value)


def _check_count(value: object, name: str, limits: Limits) -> None:
    """A one-line error unless ``value`` is an integer within ``limits``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DifflabError(f"{name} must be {limits.describe()}, got {value!r}")
    limits.check(value, name)


def load_run(
    path: str | Path,
    checkpoint: str | Path | int | None = None,
    ema: bool = True,
    device: str | torch.device = "auto",
    guide: str | Path | None = None,
) -> Run:
    """A run directory (its newest checkpoint, or ``checkpoint``) or an exported .safetensors.

    ``guide``: a weaker model of the same method to guide away from (autoguidance; a run
    directory, one of its checkpoint folders or an export); by default the run's own guide
    when its config has one (``sampler.guide_at``). ``checkpoint``: a checkpoint folder, its
    name (``step-00001000``) or its step (1000).
    """
    path = _check_path(path, "path")
    if isinstance(checkpoint, int) and not isinstance(checkpoint, bool):
        _check_count(checkpoint, "checkpoint (a step)", START)
        checkpoint = str(checkpoint)  # a step number: that checkpoint of the run
    elif checkpoint is not None:
        checkpoint = _check_path(checkpoint, "checkpoint")
    guide = None if guide is None else _check_path(guide, "guide")
    _check_bool(ema, "ema")
    torch_device = resolve_device(str(device))  # a torch.device is checked as its name is

    def build(config: Config) -> nn.Module:
        return build_network(config).to(torch_device).eval()

    loaded = load_model(path, build, checkpoint, ema)
    config = loaded.config
    guide_net = model_guide(Path(path), config, build, loaded.step, guide)
    if guide is not None:  # named here: it guides at the run's weight, or at w = 2 if that is 1
        check_weaker(loaded.net, guide_net, str(guide))
        config = dataclasses.replace(config, sampler=config.sampler.with_guide())
    method = build_method(config)
    return Run(
        config, method, loaded.net, loaded.source, loaded.step, guide_net, loaded.weights,
        guide_named=guide is not None,
    )  # fmt: skip
