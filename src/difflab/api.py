"""The Python API: load a run directory (or an exported file) and sample from it.

run = difflab.load_run("runs/cars")
images = run.sample(16, seed=0)          # float [-1, 1], [16, 3, 32, 32]
difflab.save_grid(images, "cars.png")
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from difflab.config import Config, SamplerConfig, from_dict, load_json, validate
from difflab.devices import resolve_device
from difflab.errors import DifflabError
from difflab.registry import Method, SamplingPlan, build_method, build_network, build_sampler
from difflab.sampling import Generated, generate, image_seeds
from difflab.train.checkpoint import (
    Checkpoint,
    _load_weights,
    load_checkpoint,
    load_weights_into,
    newest_usable,
)


@dataclass
class Run:
    """A trained model ready to sample: its config, method and (EMA) network."""

    config: Config
    method: Method
    net: nn.Module
    device: torch.device
    source: Path
    step: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.config.data.image_size, self.config.data.image_size)

    def plan(self, sampler: str | None = None, steps: int | None = None, **options) -> SamplingPlan:
        """The run's sampler, or another compatible one by name with its own defaults.

        ``options`` are any ``SamplerConfig`` fields (eta, grid, rho, s_churn, clip_x0, ...).
        """
        config = self.config.sampler if sampler is None else SamplerConfig(name=sampler)
        if steps is not None:
            options["steps"] = steps
        return build_sampler(self.method, dataclasses.replace(config, **options))

    def generate(
        self,
        num: int,
        seed: int = 0,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        plan: SamplingPlan | None = None,
        batch_size: int = 64,
        start: int = 0,
        record: bool = False,
        progress: bool = False,
    ) -> Generated:
        """Images ``start .. start + num - 1`` of the sequence that ``seed`` defines."""
        plan = plan or self.plan(sampler, steps)
        return generate(
            self.method.denoiser(self.net),
            plan,
            self.image_shape,
            image_seeds(seed, start, num),
            batch_size=batch_size,
            device=self.device,
            record=record,
            progress=progress,
        )

    def sample(self, num: int = 16, seed: int = 0, **kwargs) -> Tensor:
        """``num`` images as a float tensor in [-1, 1] (clip before saving; see ``viz``)."""
        return self.generate(num, seed, **kwargs).images


def build_model(config: Config, device: torch.device) -> tuple[Method, nn.Module]:
    return build_method(config), build_network(config).to(device)


def load_run(
    path: str | Path,
    checkpoint: str | Path | None = None,
    ema: bool = True,
    device: str = "auto",
) -> Run:
    """A run directory (its newest checkpoint, or ``checkpoint``) or an exported .safetensors."""
    path = Path(path)
    torch_device = resolve_device(device)
    if path.is_file():
        return _load_exported(path, torch_device)
    if not path.is_dir():
        raise DifflabError(f"run directory {path} does not exist")
    config = load_json(path / "config.json")
    method, net = build_model(config, torch_device)

    def use(ckpt: Checkpoint) -> int:
        weights = ckpt.ema if ema and ckpt.ema is not None else ckpt.net
        load_weights_into(net, weights, ckpt.path)
        return ckpt.step

    step = use(load_checkpoint(Path(checkpoint))) if checkpoint else newest_usable(path, use)
    if step is None:
        raise DifflabError(f"{path} has no usable checkpoint; train it first (difflab train)")
    return Run(config, method, net.eval(), torch_device, path, step)


def _load_exported(path: Path, device: torch.device) -> Run:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises several types for foreign files
        raise DifflabError(f"{path} is not a difflab export or run directory ({error})") from None
    if "config" not in metadata:
        raise DifflabError(
            f"{path} has no difflab config in its metadata: export it with difflab export"
        )
    config = validate(from_dict(json.loads(metadata["config"])))
    method, net = build_model(config, device)
    load_weights_into(net, _load_weights(path), path)
    return Run(config, method, net.eval(), device, path, int(metadata.get("step", 0)))
