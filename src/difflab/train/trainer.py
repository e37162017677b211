"""The training loop: set up, then one optimizer step after another, in named phases.

Randomness is a pure function of (seed, step): the batch indices, flips, noise levels and noise
of step s come from generators seeded with ``derive_seed(seed, purpose, s)``. So the step
counter *is* the RNG state, and resuming at step s is bit-identical to never having stopped.
Under torchrun every rank draws the whole global batch's randomness and keeps its own slice, so
N processes compute the same per-sample losses as one.

A step never waits for the device: its loss and gradient norm stay there until the loop reads
them, all at once, before anything leaves the loop (a log row, a picture, an FID point, a
checkpoint). A non-finite value stops training there, naming the step where it first appeared,
so no non-finite weights ever reach a checkpoint.
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
from difflab.devices import autocast_dtype, configure, generator, resolve_device, to_device
from difflab.errors import DifflabError, brief
from difflab.models import forward_gflops
from difflab.registry import Method, build_method, build_network, build_sampler
from difflab.sampling import derive_seed
from difflab.train import distributed as D
from difflab.train.batches import batch_indices, images_before
from difflab.train.checkpoint import (
    Checkpoint,
    checkpoint_dir,
    list_checkpoints,
    load_model,
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
from difflab.train.signals import StopRequest

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


class Trainer:
    """Owns the state of one training process.

    ``train_step()`` is one optimizer step (what a benchmark times), ``run()`` the whole loop.
    Use it as a context manager: leaving it releases the run directory.
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        init: Path | None = None,
        data: ImageSet | None = None,
        progress: bool = True,
        device: torch.device | None = None,
    ) -> None:
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        # Devices and processes: torchrun gives each rank its own GPU.
        device = device or resolve_device(config.train.device)
        self.world = D.init_world(device.type)
        if device.type == "cuda" and self.world.distributed:
            device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        configure(device)
        self.config = dataclasses.replace(config, world_size=self.world.size)
        self.lock = RunLock(self.run_dir) if self.world.is_main else None
        self.logbook: TrainLog | None = None
        self._claim_run_dir(resume)
        try:
            self._build(data, init, resume)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the run directory and close the logs (idempotent)."""
        if self.logbook is not None:
            self.logbook.close()
        if self.lock is not None:
            self.lock.__exit__()

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
            load_model(init, lambda _source_config: self.net)
        self.ema = make_ema(self.net) if t.ema_halflife_kimg > 0 else None
        self.optimizer = self._make_optimizer()
        self.step, self.images_seen, self.elapsed = 0, 0, 0.0
        if resume:
            self._load_state()
        self.conditional = config.network.name == "unet" and config.network.unet.num_classes > 0
        self.autocast = self._autocast_dtype()
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (step, loss, grad norm) on device
        self._window: list[tuple[float, float]] = []  # read back, not yet in a log row
        self.last_loss = math.nan

        # What the loop calls: DDP and compile wrap the same parameters.
        eager: nn.Module = self.net
        self.ddp: DistributedDataParallel | None = None
        if self.world.distributed:
            ids = [device.index] if device.type == "cuda" else None
            eager = self.ddp = DistributedDataParallel(self.net, device_ids=ids)
        self._eager_denoiser = self.method.denoiser(eager)
        self.train_denoiser = self._eager_denoiser
        if t.compile:
            mode = None if t.compile_mode == "default" else t.compile_mode
            self.train_denoiser = self.method.denoiser(torch.compile(eager, mode=mode))
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
        # One fused kernel per step on CUDA; the CPU keeps the default (bit-exact resume there).
        fused = True if t.fused_optimizer and self.device.type == "cuda" else None
        return cls(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused)

    def _autocast_dtype(self) -> torch.dtype | None:
        t = self.config.train
        gflop = 0.0
        if self.device.type == "cuda" and t.precision == "auto":  # decided by the work per step
            per_device = t.batch_size / (t.accumulation * self.world.size)
            gflop = forward_gflops(self.net, 3, self.config.data.image_size) * per_device
        return autocast_dtype(self.device, t.precision, gflop)

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

    def train_step(self) -> None:
        """One optimizer step on the global batch, then the EMA and the counters.

        Nothing is read back from the device; ``read_back`` does that for many steps at once.
        """
        loss, grad_norm = self._optimize()
        batch_images = images_before(self.step + 1, len(self.images), self.config)
        batch_images -= self.images_seen
        self.step += 1
        self.images_seen += batch_images
        if self.ema is not None:
            beta = ema_beta(batch_images, self.images_seen, self.config.train)
            update_ema(self.ema, self.net, beta)
        self._pending.append((self.step, loss, grad_norm))

    def read_back(self) -> list[tuple[float, float]]:
        """(loss, gradient norm) of the steps since the last call, copied from the device in one
        go; a non-finite value stops training with the step where it first appeared."""
        if not self._pending:
            return []
        steps = [step for step, _, _ in self._pending]
        values = torch.stack([torch.stack(v) for _, *v in self._pending]).tolist()
        self._pending = []
        for step, (loss, norm) in zip(steps, values, strict=True):
            for what, value in (("loss", loss), ("gradient norm", norm)):
                if not math.isfinite(value):
                    self._fail_non_finite(what, value, step)
        self._window += values
        self.last_loss = values[-1][0]
        return values

    def _optimize(self) -> tuple[Tensor, Tensor]:
        """The optimizer step; a failing ``torch.compile`` falls back to eager with a warning."""
        try:
            return self._optimize_once()
        except torch._dynamo.exc.TorchDynamoException as error:
            if self.train_denoiser is self._eager_denoiser:
                raise
            log.warning("torch.compile failed, training goes on without it (%s)", brief(error))
            self.train_denoiser = self._eager_denoiser
            return self._optimize_once()

    def _optimize_once(self) -> tuple[Tensor, Tensor]:
        t, world, device = self.config.train, self.world, self.device
        index = to_device(batch_indices(self.step, len(self.images), self.config), device)
        total = len(index)
        gen = generator(device, derive_seed(t.seed, "noise", self.step))
        draw = self.method.objective.draw(total, tuple(self.images.shape[1:]), gen, device)
        flips = torch.rand(total, generator=gen, device=device) < 0.5
        torch.manual_seed(derive_seed(t.seed, "dropout", self.step, world.rank))

        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
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
        self.optimizer.step()
        return loss_sum / total, grad_norm.detach().to(loss_sum)

    def _batch(self, index: Tensor, flips: Tensor) -> Tensor:
        x0 = self.images[index].float().div_(127.5).sub_(1.0)
        if self.config.data.hflip:
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        if self.config.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0

    def _autocast(self):
        if self.autocast is not None:
            return torch.autocast(self.device.type, dtype=self.autocast)
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
        with self:
            return self._run()

    def _run(self) -> TrainResult:
        t = self.config.train
        started = time.monotonic()
        if self._limits_reached(started):
            return self._result("already-done", math.nan)
        if self.world.is_main and self.step == 0:
            self.pictures.at_start(self.data, self.method.objective)
        bar = self._progress_bar()
        self._last_row = (time.monotonic(), self.images_seen)
        stopped_by = None
        with StopRequest() as stop:
            while stopped_by is None:
                step_start = time.monotonic()
                previous_images = self.images_seen
                self.train_step()
                self.elapsed += time.monotonic() - step_start
                if self.world.is_main:
                    bar.update(self._bar_position(started) - bar.n)
                    if self.step % t.log_every == 0:
                        self._log(bar)
                    if self._crossed(previous_images, t.sample_every_kimg):
                        self._pictures()
                    if self.quality and self._crossed(previous_images, t.eval_every_kimg):
                        self._evaluate()
                stopped_by = self._limits_reached(started)
                # Ranks agree on stopping: a signal, or a clock that ran out, on any of them.
                flags = [stop.signum != 0, stopped_by == "time-limit"]
                signalled, out_of_time = D.any_rank(self.world, flags, self.device)
                if signalled or out_of_time:
                    stopped_by = "signal" if signalled else "time-limit"
                if stopped_by is None and self.step % t.checkpoint_every == 0:
                    self._checkpoint()
        bar.close()
        self._checkpoint()
        result = self._result(stopped_by, self.last_loss)
        if stopped_by == "signal":
            raise Interrupted(result, stop.signum or signal.SIGTERM)
        if self.world.is_main:
            self._pictures(final=True)
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

    def _fail_non_finite(self, what: str, value: float, step: int) -> None:
        raise DifflabError(
            f"the {what} became {value} at step {step}; training stopped and the last good "
            f"checkpoint in {self.run_dir / 'checkpoints'} was kept: lower train.lr or set "
            "train.grad_clip, then --resume"
        )

    def _log(self, bar: tqdm) -> None:
        self.read_back()
        window, self._window = self._window, []
        now, images = time.monotonic(), self.images_seen
        seconds = max(now - self._last_row[0], 1e-9)
        row = {
            "step": self.step,
            "kimg": images / 1000,
            "loss": sum(loss for loss, _ in window) / len(window),
            "lr": lr_at(self.step - 1, self.config.train),
            "grad_norm": window[-1][1],
            "images_per_s": (images - self._last_row[1]) / seconds,
            "ema_loss": self._ema_loss(),
            "time_s": self.elapsed,
        }
        self._last_row = (now, images)
        self.logbook.write(row)
        bar.set_postfix(step=self.step, kimg=f"{row['kimg']:.1f}", loss=f"{row['loss']:.4f}")

    @torch.no_grad()
    def _ema_loss(self) -> float:
        """Loss of the EMA weights on a fixed batch: a less noisy view of progress."""
        if self.ema is None:
            return math.nan
        count = min(len(self.images), self.config.train.batch_size)
        gen = generator(self.device, derive_seed(self.config.train.seed, "ema-loss"))
        draw = self.method.objective.draw(count, tuple(self.images.shape[1:]), gen, self.device)
        x0 = self.images[:count].float().div(127.5).sub(1.0)
        labels = self.labels[:count] if self.conditional else None
        with self._autocast():
            return float(
                self.method.objective.loss(self.method.denoiser(self.ema), x0, draw, labels).mean()
            )

    def _evaluate(self) -> None:
        self.read_back()
        scores = self.quality.measure(self.method.denoiser(self.ema or self.net), self.device)
        self.logbook.write({"step": self.step, "kimg": self.images_seen / 1000, **scores})

    def _pictures(self, final: bool = False) -> None:
        self.read_back()
        self.pictures.preview(self.ema or self.net, self.images_seen, self.device, final=final)
        self.logbook.plot()

    def _checkpoint(self) -> None:
        self.read_back()  # every rank: a non-finite step stops them all before anything is saved
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
