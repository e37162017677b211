"""The trainer: a run's state, set up once, and its optimizer step.

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
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from difflab.classes import learn_classes
from difflab.config import Config, save_json
from difflab.data import ImageSet, load_images
from difflab.denoisers import Denoiser
from difflab.devices import (
    autocast_dtype,
    compile_module,
    compiled_layout,
    configure,
    generator,
    resolve_device,
    to_device,
)
from difflab.errors import DifflabError, brief
from difflab.models import forward_gflops
from difflab.plans import build_sampler
from difflab.registry import Method, build_method, build_network
from difflab.seeds import derive_seed
from difflab.train import distributed as D
from difflab.train.batches import batch_indices, images_before
from difflab.train.checkpoint import (
    Checkpoint,
    checkpoint_dir,
    list_checkpoints,
    load_model,
    load_weights_into,
    newest_metadata,
    newest_usable,
    prune_checkpoints,
    save_checkpoint,
)
from difflab.train.ema import make_ema, update_ema
from difflab.train.guides import own_guide
from difflab.train.rundir import (
    RunLock,
    check_existing_run_dir,
    check_new_run_dir,
    check_past_rates,
    check_same_run,
    checked_config,
    data_record,
)
from difflab.train.schedule import ema_beta, guide_step, lr_at

log = logging.getLogger("difflab")


class Trainer:
    """Owns the state of one training process: data, network, EMA, optimizer, counters.

    ``train_step()`` is one optimizer step (what a benchmark times), ``checkpoint()`` saves
    one; ``difflab.train.loop`` runs the whole loop around them. Use it as a context manager:
    leaving it releases the run directory.
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        init: Path | None = None,
        data: ImageSet | None = None,
        device: torch.device | None = None,
    ) -> None:
        # From Python as from the command line: checked (types too) and its paths absolute.
        config = checked_config(config)
        self.config, self.run_dir = config, Path(run_dir)
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
        """Release the run directory (idempotent)."""
        if self.lock is not None:
            self.lock.__exit__()

    def _build(self, data: ImageSet | None, init: Path | None, resume: bool) -> None:
        config, t, device = self.config, self.config.train, self.device
        # Data: the whole set lives on the device as uint8; a batch is an index away.
        data = data or load_images(
            config.data.source, config.data.class_name, config.data.image_size
        )
        # A conditional run learns the data's classes: the config (and config.json) say which.
        self.config = config = learn_classes(config, data.class_names, data.source)
        self.labels = data.labels.to(device)
        self.images = data.images.to(device)
        self.data, self.data_record = data, data_record(data)

        # Model, EMA, optimizer.
        self.method: Method = build_method(config)
        self.method.objective.prepare(device)  # e.g. a distillation teacher, on the device
        torch.manual_seed(derive_seed(t.seed, "init"))  # the same seed gives the same network
        self.net: nn.Module = build_network(config).to(device)
        if t.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if init is not None:
            start = load_model(init, lambda _source_config: self.net)
            if self.world.is_main:
                log.info(
                    "starting from %s: step %d, %s weights", start.source, start.step, start.weights
                )
        self.ema = make_ema(self.net) if t.ema_halflife_kimg > 0 else None
        # The second network an objective may compare against (consistency's theta^-).
        self._target = self.method.denoiser(self.ema) if self.ema is not None else None
        self.optimizer = self._make_optimizer()
        self.step, self.images_seen, self.elapsed = 0, 0, 0.0
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (step, loss, grad norm) on device
        self.window: list[tuple[float, float]] = []  # read back; the loop takes them for a log row
        self.last_loss = math.nan
        if resume:
            self._load_state()
        # after resuming: a refused resume, or one with nothing left to train, leaves
        # config.json as it was
        if self.world.is_main and not (resume and self.length_reached()):
            save_json(config, self.run_dir / "config.json")
        if init is not None and not resume:  # what a resume before the first checkpoint loads:
            self.checkpoint()  # config.json does not say where the weights came from
        self.conditional = self.net.num_classes > 0  # the network says whether it takes classes
        self.autocast = self._autocast_dtype()

        # What the loop calls: DDP and compile wrap the same parameters.
        eager: nn.Module = self.net
        self.ddp: DistributedDataParallel | None = None
        if self.world.distributed:
            ids = [device.index] if device.type == "cuda" else None
            eager = self.ddp = DistributedDataParallel(self.net, device_ids=ids)
        self._eager_denoiser = self.method.denoiser(eager)
        self.train_denoiser = self._eager_denoiser
        if t.compile:
            layout = compiled_layout(t.compile_layout, device)
            compiled = compile_module(eager, t.compile_mode, layout)
            self.train_denoiser = self.method.denoiser(compiled)
        self.plan = build_sampler(self.method, config.sampler)

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
        metadata = newest_metadata(self.run_dir)
        if metadata is not None:  # before any weights: a changed network is not "damaged"
            check_same_run(self.run_dir, metadata, self.config, self.data_record)
        resumed = newest_usable(self.run_dir, self._load_checkpoint)
        if resumed is not None:
            check_past_rates(self.run_dir, resumed.config, self.config, self.step)
            return
        if paths:  # starting over would let pruning delete the new checkpoints, not the bad ones
            raise DifflabError(
                f"none of the {len(paths)} checkpoints in {checkpoint_dir(self.run_dir)} can be "
                "resumed (see the warnings above); move them away to start over"
            )
        # a run that stopped before its first checkpoint starts over (one started from other
        # weights has its step-0 checkpoint: _build writes it)

    def length_reached(self) -> str | None:
        """Which length of its config ("steps" or "images") the run has reached, or None."""
        t = self.config.train
        if t.steps and self.step >= t.steps:
            return "steps"
        if t.images and self.images_seen >= t.images:
            return "images"
        return None

    def _load_checkpoint(self, ckpt: Checkpoint) -> Checkpoint:
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
        return ckpt

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
        self.window += values
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
        shape = tuple(self.images.shape[1:])
        draw = self.method.objective.draw(total, shape, gen, device, self.images_seen)
        flips = torch.rand(total, generator=gen, device=device) < 0.5
        labels = self._dropped_labels(index, gen) if self.conditional else None
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
                mine_labels = None if labels is None else labels[rows]
                per_sample = self.method.objective.loss(
                    self.train_denoiser, x0, draw[rows], mine_labels, self._target
                )
                loss = per_sample.sum() * (world.size / total)
                loss.backward()
            loss_sum += per_sample.detach().sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip or math.inf)
        if world.distributed:
            torch.distributed.all_reduce(loss_sum)
        self.optimizer.step()
        return loss_sum / total, grad_norm.detach().to(loss_sum)

    def _dropped_labels(self, index: Tensor, gen: torch.Generator) -> Tensor:
        """The batch's labels, each replaced by -1 ("no class") with probability
        ``train.label_dropout``, so one network learns p(x | class) and p(x) (Ho & Salimans
        2022, Algorithm 1)."""
        drop = torch.rand(len(index), generator=gen, device=self.device)
        return torch.where(drop < self.config.train.label_dropout, -1, self.labels[index])

    def _fail_non_finite(self, what: str, value: float, step: int) -> None:
        raise DifflabError(
            f"the {what} became {value} at step {step}; training stopped and the last good "
            f"checkpoint in {self.run_dir / 'checkpoints'} was kept: lower train.lr or set "
            "train.grad_clip, then --resume"
        )

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

    # ----------------------------------------------------------------- for the loop

    @torch.no_grad()
    def ema_loss(self) -> float:
        """Loss of the EMA weights on a fixed batch: a less noisy view of progress (against
        the target network the step offers, for objectives that compare two)."""
        if self.ema is None:
            return math.nan
        count = min(len(self.images), self.config.train.batch_size)
        gen = generator(self.device, derive_seed(self.config.train.seed, "ema-loss"))
        shape = tuple(self.images.shape[1:])
        draw = self.method.objective.draw(count, shape, gen, self.device, self.images_seen)
        x0 = self.images[:count].float().div(127.5).sub(1.0)
        labels = self.labels[:count] if self.conditional else None
        with self._autocast():
            ema = self.method.denoiser(self.ema)
            return float(self.method.objective.loss(ema, x0, draw, labels, self._target).mean())

    def guide(self) -> Denoiser | None:
        """The run's own guide for its previews (``sampler.guide_at``), once it is past it."""
        net = own_guide(self.run_dir, self.config, self._build_eval_net, self.step)
        return None if net is None else self.method.denoiser(net)

    def _build_eval_net(self, config: Config) -> nn.Module:
        return build_network(config).to(self.device).eval()

    def checkpoint(self) -> None:
        """Write a checkpoint of the current step (rank 0), after checking the pending losses:
        every rank reads them, so a non-finite step stops them all before anything is saved."""
        self.read_back()
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
            "data": self.data_record,
        }
        guide = 0 < self.step == guide_step(self.config)  # kept: the run's autoguidance guide
        save_checkpoint(self.run_dir, self.step, self.net, self.ema, state, guide)
        prune_checkpoints(self.run_dir, t.keep_last, t.snapshot_every, self.step)
