"""The training loop: set up, then one optimizer step after another, in named phases.

Randomness is a pure function of (seed, step): the batch indices, flips, noise levels and noise
of step s come from generators seeded with ``derive_seed(seed, purpose, s)``. So the step
counter *is* the RNG state, and resuming at step s is bit-identical to never having stopped.
Under torchrun every rank draws the whole global batch's randomness and keeps its own slice, so
N processes compute the same per-sample losses as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from difflab.config import Config, save_json
from difflab.data import ImageSet, load_images
from difflab.devices import resolve_device
from difflab.errors import DifflabError
from difflab.registry import Method, build_method, build_network, build_sampler
from difflab.sampling import derive_seed
from difflab.train import distributed as D
from difflab.train.checkpoint import (
    Checkpoint,
    checkpoint_dir,
    list_checkpoints,
    load_weights_into,
    newest_usable,
    prune_checkpoints,
    save_checkpoint,
)
from difflab.train.ema import make_ema, update_ema
from difflab.train.logs import TrainLog
from difflab.train.pictures import Pictures
from difflab.train.quality import QualityProbe
from difflab.train.rundir import RunLock, check_existing_run_dir, check_new_run_dir
from difflab.train.schedule import ema_beta, lr_at

log = logging.getLogger("difflab")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images_seen: int
    stopped_by: str  # "steps", "images", "time-limit", "signal", "already-done"
    loss: float = math.nan


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was saved."""

    def __init__(self, result: TrainResult, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.result, self.signum = result, signum


class _StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- batches


def batch_indices(step: int, num_images: int, config: Config) -> Tensor:
    """Indices of the global batch of optimizer step ``step`` (a pure function of step)."""
    t = config.train
    if t.batching == "random":  # the TF notebook: draws with replacement
        gen = torch.Generator().manual_seed(derive_seed(t.seed, "batch", step))
        return torch.randint(num_images, (t.batch_size,), generator=gen)
    # The PyTorch notebook: shuffled passes, the last batch of a pass smaller.
    per_epoch = math.ceil(num_images / t.batch_size)
    epoch, position = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(derive_seed(t.seed, "epoch", epoch))
    order = torch.randperm(num_images, generator=gen)
    return order[position * t.batch_size : (position + 1) * t.batch_size]


def images_before(step: int, num_images: int, config: Config) -> int:
    """Training images seen after ``step`` optimizer steps."""
    t = config.train
    if t.batching == "random":
        return step * t.batch_size
    per_epoch = math.ceil(num_images / t.batch_size)
    epochs, position = divmod(step, per_epoch)
    return epochs * num_images + min(position * t.batch_size, num_images)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Owns the state of one training process; ``run()`` is the loop."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        init: Path | None = None,
        data: ImageSet | None = None,
        progress: bool = True,
    ) -> None:
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        t = config.train
        # Devices and processes: torchrun gives each rank its own GPU.
        device = resolve_device(t.device)
        self.world = D.init_world(device.type)
        if device.type == "cuda" and self.world.distributed:
            device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.autocast = device.type == "cuda" and t.precision in ("auto", "bf16")
        self.config = dataclasses.replace(config, world_size=self.world.size)
        self.lock = RunLock(self.run_dir) if self.world.is_main else None
        self._claim_run_dir(resume)
        try:
            self._build(data, init, resume)
        except BaseException:
            self._release()
            raise

    def _build(self, data: ImageSet | None, init: Path | None, resume: bool) -> None:
        config, t, device = self.config, self.config.train, self.device
        # Data: the whole set lives on the device as uint8; a batch is an index away.
        data = data or load_images(
            config.data.source, config.data.class_name, config.data.image_size
        )
        self.labels = data.labels.to(device)
        self.images = data.images.to(device)
        self.data = data

        # Model, EMA, optimizer.
        self.method: Method = build_method(config)
        torch.manual_seed(derive_seed(t.seed, "init"))  # the same seed gives the same network
        self.net: nn.Module = build_network(config).to(device)
        if t.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if init is not None:
            self._init_from(init)
        self.ema = make_ema(self.net) if t.ema_halflife_kimg > 0 else None
        self.optimizer = self._make_optimizer()
        self.step, self.images_seen, self.elapsed = 0, 0, 0.0
        if resume:
            self._load_state()
        self.conditional = config.network.name == "unet" and config.network.unet.num_classes > 0

        # What the loop calls: DDP and compile wrap the same parameters.
        train_net: nn.Module = self.net
        self.ddp: DistributedDataParallel | None = None
        if self.world.distributed:
            ids = [device.index] if device.type == "cuda" else None
            train_net = self.ddp = DistributedDataParallel(self.net, device_ids=ids)
        if t.compile:
            train_net = torch.compile(train_net)
        self.train_net = train_net
        self.train_denoiser = self.method.denoiser(train_net)
        self.plan = build_sampler(self.method, config.sampler)
        if self.world.is_main:
            self.logbook = TrainLog(self.run_dir, start_step=self.step)
            self.pictures = Pictures(self.run_dir, self.method, self.plan, config)
            self.quality = QualityProbe(config, self.plan) if t.eval_every_kimg > 0 else None

    # ----------------------------------------------------------------- setup phases

    def _claim_run_dir(self, resume: bool) -> None:
        """Rank 0 locks and checks the run directory; the other ranks learn the verdict."""
        error = None
        if self.world.is_main:
            try:
                if resume:
                    check_existing_run_dir(self.run_dir)
                else:
                    check_new_run_dir(self.run_dir)
                self.lock.__enter__()
                save_json(self.config, self.run_dir / "config.json")
            except DifflabError as e:
                error = str(e)
        error = D.broadcast_object(self.world, error)
        if error:
            raise DifflabError(error)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.config.train
        params = self.net.parameters()
        if t.optimizer == "sgd":  # momentum = betas[0]
            return torch.optim.SGD(
                params, lr=t.lr, momentum=t.betas[0], weight_decay=t.weight_decay
            )
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)

    def _init_from(self, path: Path) -> None:
        from difflab.api import load_run

        source = load_run(path, device="cpu")
        load_weights_into(self.net, source.net.state_dict(), Path(path))

    def _load_state(self) -> None:
        """The newest checkpoint that loads and fits; damaged ones are skipped with a warning."""
        paths = list_checkpoints(self.run_dir)
        if newest_usable(self.run_dir, self._load_checkpoint):
            return
        if paths:  # starting over would let pruning delete the new checkpoints, not the bad ones
            raise DifflabError(
                f"none of the {len(paths)} checkpoints in {checkpoint_dir(self.run_dir)} can be "
                "resumed (see the warnings above); move them away to start over"
            )
        # a run that stopped before its first checkpoint starts over

    def _load_checkpoint(self, ckpt: Checkpoint) -> bool:
        load_weights_into(self.net, ckpt.net, ckpt.path)
        if self.ema is not None:
            load_weights_into(self.ema, ckpt.ema if ckpt.ema is not None else ckpt.net, ckpt.path)
        try:
            self.optimizer.load_state_dict(ckpt.state["optimizer"])
        except (KeyError, ValueError) as error:
            raise DifflabError(
                f"optimizer state in {ckpt.path} does not fit this run ({error})"
            ) from None
        self.step = int(ckpt.state["step"])
        self.images_seen = int(ckpt.state["images_seen"])
        self.elapsed = float(ckpt.state.get("elapsed", 0.0))
        log.info("resuming from %s (step %d, %d images)", ckpt.path, self.step, self.images_seen)
        return True

    # ----------------------------------------------------------------- the step

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step on the global batch; returns (mean loss, gradient norm)."""
        t, world = self.config.train, self.world
        index = batch_indices(self.step, len(self.images), self.config).to(self.device)
        total = len(index)
        gen = torch.Generator(self.device).manual_seed(derive_seed(t.seed, "noise", self.step))
        shape = tuple(self.images.shape[1:])
        draw = self.method.objective.draw(total, shape, gen, self.device)
        flips = torch.rand(total, generator=gen, device=self.device) < 0.5
        torch.manual_seed(derive_seed(t.seed, "dropout", self.step, world.rank))

        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        micro = math.ceil(total / t.accumulation)
        for k, start in enumerate(range(0, total, micro)):
            # This rank's share of micro-batch k; the loss is scaled so that DDP's gradient
            # average equals the gradient of the global batch mean.
            part = slice(start, min(start + micro, total))
            mine = D.shard(part.stop - part.start, world)
            rows = slice(part.start + mine.start, part.start + mine.stop)
            last = k == math.ceil(total / micro) - 1
            sync = self.ddp.no_sync() if self.ddp and not last else contextlib.nullcontext()
            with sync, self._autocast():
                x0 = self._batch(index[rows], flips[rows])
                labels = self.labels[index[rows]] if self.conditional else None
                per_sample = self.method.objective.loss(self.train_denoiser, x0, draw[rows], labels)
                loss = per_sample.sum() * (world.size / total)
                loss.backward()
            loss_sum += per_sample.detach().sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip or math.inf)
        if world.distributed:
            torch.distributed.all_reduce(loss_sum)
        # The step's one device-to-host copy; both values are the same on every rank.
        loss, norm = torch.stack([loss_sum / total, grad_norm.to(loss_sum)]).tolist()
        if not math.isfinite(loss):  # stop before the weights go bad
            self._fail_non_finite("loss", loss)
        if not math.isfinite(norm):
            self._fail_non_finite("gradient norm", norm)
        self.optimizer.step()
        return loss, norm

    def _batch(self, index: Tensor, flips: Tensor) -> Tensor:
        x0 = self.images[index].float().div_(127.5).sub_(1.0)
        if self.config.data.hflip:
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        if self.config.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0

    def _autocast(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- the loop

    def _limits_reached(self, started: float) -> str | None:
        t = self.config.train
        if t.steps and self.step >= t.steps:
            return "steps"
        if t.images and self.images_seen >= t.images:
            return "images"
        if t.time_limit and time.monotonic() - started >= t.time_limit * 60:
            return "time-limit"
        return None

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.__exit__()

    def _run(self) -> TrainResult:
        t = self.config.train
        started = time.monotonic()
        if self._limits_reached(started):
            return self._result("already-done", math.nan)
        if self.world.is_main and self.step == 0:
            self.pictures.at_start(self.data, self.method.objective)
        bar = self._progress_bar()
        last_loss, window = math.nan, []
        stopped_by = None
        with _StopRequest() as stop:
            while stopped_by is None:
                step_start = time.monotonic()
                loss, grad_norm = self._train_step()
                batch_images = (
                    images_before(self.step + 1, len(self.images), self.config) - self.images_seen
                )
                previous_images = self.images_seen
                self.step += 1
                self.images_seen += batch_images
                if self.ema is not None:
                    update_ema(self.ema, self.net, ema_beta(batch_images, self.images_seen, t))
                last_loss = loss
                window.append(loss)
                seconds = time.monotonic() - step_start
                self.elapsed += seconds
                if self.world.is_main:
                    bar.update(self._bar_position(started) - bar.n)
                    bar.set_postfix(
                        step=self.step, kimg=f"{self.images_seen / 1000:.1f}", loss=f"{loss:.4f}"
                    )
                    if self.step % t.log_every == 0:
                        self._log(window, grad_norm, batch_images / max(seconds, 1e-9))
                        window = []
                    if self._crossed(previous_images, t.sample_every_kimg):
                        self._pictures()
                    if self.quality and self._crossed(previous_images, t.eval_every_kimg):
                        self._evaluate()
                stopped_by = self._limits_reached(started)
                if D.any_rank(self.world, stop.signum != 0, self.device):
                    stopped_by = "signal"
                if stopped_by is None and self.step % t.checkpoint_every == 0:
                    self._checkpoint()
        bar.close()
        self._checkpoint()
        result = self._result(stopped_by, last_loss)
        if stopped_by == "signal":
            raise Interrupted(result, stop.signum or signal.SIGTERM)
        if self.world.is_main:
            self._pictures(final=True)
            self.logbook.close()
        return result

    def _crossed(self, previous_images: int, every_kimg: float) -> bool:
        if every_kimg <= 0:
            return False
        every = every_kimg * 1000
        return math.floor(self.images_seen / every) > math.floor(previous_images / every)

    def _progress_bar(self) -> tqdm:
        """Counts whichever limit is meant to end the run: wall clock, steps or images."""
        t = self.config.train
        if t.time_limit:
            total, unit = t.time_limit * 60, "s"
            layout = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"
        else:
            total, unit = (t.steps, "step") if t.steps else (t.images, "img")
            layout = None
        return tqdm(
            total=total or None,
            initial=0 if t.time_limit else self._bar_position(0.0),
            unit=unit,
            desc="training",
            bar_format=layout,
            disable=not (self.progress and self.world.is_main),
            dynamic_ncols=True,
        )

    def _bar_position(self, started: float) -> float:
        t = self.config.train
        if t.time_limit:
            return min(time.monotonic() - started, t.time_limit * 60)
        return self.step if t.steps else self.images_seen

    def _fail_non_finite(self, what: str, value: float) -> None:
        raise DifflabError(
            f"the {what} became {value} at step {self.step + 1}; training stopped and the last good "
            f"checkpoint in {self.run_dir / 'checkpoints'} was kept: lower train.lr or set "
            "train.grad_clip, then --resume"
        )

    def _log(self, window: list[float], grad_norm: float, images_per_s: float) -> None:
        row = {
            "step": self.step,
            "kimg": self.images_seen / 1000,
            "loss": sum(window) / len(window),
            "lr": lr_at(self.step - 1, self.config.train),
            "grad_norm": grad_norm,
            "images_per_s": images_per_s,
            "ema_loss": self._ema_loss(),
            "time_s": self.elapsed,
        }
        self.logbook.write(row)

    @torch.no_grad()
    def _ema_loss(self) -> float:
        """Loss of the EMA weights on a fixed batch: a less noisy view of progress."""
        if self.ema is None:
            return math.nan
        count = min(len(self.images), self.config.train.batch_size)
        gen = torch.Generator(self.device).manual_seed(
            derive_seed(self.config.train.seed, "ema-loss")
        )
        draw = self.method.objective.draw(count, tuple(self.images.shape[1:]), gen, self.device)
        x0 = self.images[:count].float().div(127.5).sub(1.0)
        labels = self.labels[:count] if self.conditional else None
        with self._autocast():
            return float(
                self.method.objective.loss(self.method.denoiser(self.ema), x0, draw, labels).mean()
            )

    def _evaluate(self) -> None:
        scores = self.quality.measure(self.method.denoiser(self.ema or self.net), self.device)
        self.logbook.write({"step": self.step, "kimg": self.images_seen / 1000, **scores})

    def _pictures(self, final: bool = False) -> None:
        self.pictures.preview(self.ema or self.net, self.images_seen, self.device, final=final)
        self.logbook.plot()

    def _checkpoint(self) -> None:
        if not self.world.is_main:
            return
        t = self.config.train
        state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "elapsed": self.elapsed,
            "world_size": self.world.size,
            "config": self.config.to_dict(),
        }
        save_checkpoint(self.run_dir, self.step, self.net, self.ema, state)
        prune_checkpoints(self.run_dir, t.keep_last, t.snapshot_every)

    def _result(self, stopped_by: str, loss: float) -> TrainResult:
        return TrainResult(self.run_dir, self.step, self.images_seen, stopped_by, loss)


def train(config: Config, run_dir: Path, **kwargs) -> TrainResult:
    """Train (or resume) the run in ``run_dir``; see ``Trainer`` for the keyword arguments."""
    trainer = Trainer(config, run_dir, **kwargs)
    try:
        return trainer.run()
    finally:
        D.shutdown(trainer.world)
