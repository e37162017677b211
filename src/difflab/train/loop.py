"""The training loop around a ``Trainer``: steps until a limit, with logs, pictures, FID points
and checkpoints in between, in named phases.

Only rank 0 writes logs and pictures; every rank checkpoints (rank 0 writes) and agrees on when
to stop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.config import Config, save_json
from difflab.devices import cpu_model
from difflab.train import distributed as D
from difflab.train.checkpoint import list_checkpoints
from difflab.train.logs import TrainLog
from difflab.train.pictures import Pictures
from difflab.train.quality import QualityProbe
from difflab.train.schedule import cooldown_start, guide_step, lr_at, planned_steps
from difflab.train.signals import StopRequest
from difflab.train.trainer import Trainer

log = logging.getLogger("difflab")
CALIBRATION = (5, 25)  # steps of an invocation timed to turn its --time-limit into steps


@dataclass
class TrainResult:
    """Where a training invocation stopped: the run, its step and images seen, why it stopped,
    and the last loss read back."""

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


def train(config: Config, run_dir: Path, **kwargs) -> TrainResult:
    """Train (or resume) the run in ``run_dir``; see ``Trainer`` for the keyword arguments."""
    progress = kwargs.pop("progress", True)
    trainer = Trainer(config, run_dir, **kwargs)
    try:
        with trainer:
            return Loop(trainer, progress).run()
    finally:
        D.shutdown(trainer.world)


def record_invocation(trainer: Trainer) -> None:
    """One line per training invocation in RUN_DIR/invocations.jsonl: when, from which step,
    on what machine (for reports)."""
    device = trainer.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    row = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "step": trainer.step,
        "machine": f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{trainer.world.size} process(es) on {device.type}",
    }
    with open(trainer.run_dir / "invocations.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")


class Loop:
    def __init__(self, trainer: Trainer, progress: bool = True) -> None:
        self.trainer, self.progress = trainer, progress
        t, config = trainer, trainer.config
        self.main = t.world.is_main
        if self.main:
            self.logbook = TrainLog(t.run_dir, start_step=t.step)
            self.pictures = Pictures(t.run_dir, t.method, t.plan, config)
            record_invocation(t)
        probe = self.main and config.train.eval_every_kimg > 0
        self.quality = QualityProbe(config, t.plan) if probe else None
        # A schedule that needs the run's length, bounded only by the clock: measured below.
        self.unplanned = config.train.lr_schedule == "cooldown" and not planned_steps(config.train)
        self.first_step, self.clock = t.step, 0.0

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            if self.main:
                self.logbook.close()

    def _run(self) -> TrainResult:
        trainer, t = self.trainer, self.trainer.config.train
        started = time.monotonic()
        if self._limit_reached(started):
            newest = (list_checkpoints(trainer.run_dir) or [None])[-1]
            if self.main and not self.pictures.finished(newest):  # stopped while drawing them
                self._pictures(final=True)
            return self._result("already-done")
        if self.main and trainer.step == 0:
            self.pictures.at_start(trainer.data, trainer.method.objective)
        self.last_row = (time.monotonic(), trainer.images_seen)
        stopped_by = None
        with self._progress_bar() as bar, StopRequest() as stop:  # an error closes the bar too
            while stopped_by is None:
                step_start = time.monotonic()
                previous_images = trainer.images_seen
                trainer.train_step()
                trainer.elapsed += time.monotonic() - step_start
                if self.unplanned:
                    self._plan(started)
                if self.main:
                    bar.update(self._bar_position(started) - bar.n)
                    if trainer.step % t.log_every == 0:
                        self._log(bar)
                    if self._crossed(previous_images, t.sample_every_kimg):
                        self._pictures()
                    if self.quality and self._crossed(previous_images, t.eval_every_kimg):
                        self._evaluate()
                stopped_by = self._limit_reached(started)
                # Ranks agree on stopping: a signal, or a clock that ran out, on any of them.
                flags = [stop.signum != 0, stopped_by == "time-limit"]
                signalled, out_of_time = D.any_rank(trainer.world, flags, trainer.device)
                if signalled or out_of_time:
                    stopped_by = "signal" if signalled else "time-limit"
                every = trainer.step % t.checkpoint_every == 0
                snapshot = t.snapshot_every and trainer.step % t.snapshot_every == 0
                if stopped_by is None and (
                    every or snapshot or trainer.step == guide_step(trainer.config)
                ):  # a snapshot and the run's guide are written where they fall, and kept
                    trainer.checkpoint()
            if self.main and trainer.step % t.log_every and trainer.step > self.first_step:
                self._log(bar)  # the steps since the last row (a run shorter than a row logs)
        trainer.checkpoint()
        result = self._result(stopped_by)
        if stopped_by == "signal":
            raise Interrupted(result, stop.signum or signal.SIGTERM)
        if self.main:
            self._pictures(final=True)
        return result

    # ----------------------------------------------------------------- when

    def _limit_reached(self, started: float) -> str | None:
        trainer, t = self.trainer, self.trainer.config.train
        if reached := trainer.length_reached():
            return reached
        if t.time_limit and time.monotonic() - started >= t.time_limit * 60:
            return "time-limit"
        return None

    def _plan(self, started: float) -> None:
        """Fix a --time-limit run's length once: time steps 5-25 of this invocation, turn the
        time left into steps and write them into config.json as ``train.steps``. The schedule
        is still in its stable phase (the length changes no rate already used), so a resumed
        run follows exactly the same rates."""
        trainer = self.trainer
        done = trainer.step - self.first_step
        if done not in CALIBRATION:
            return
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if done == CALIBRATION[0]:
            self.clock = time.monotonic()
            return
        now, t = time.monotonic(), trainer.config.train
        rate = (CALIBRATION[1] - CALIBRATION[0]) / max(now - self.clock, 1e-9)
        left = t.time_limit * 60 - (now - started)
        steps = D.broadcast_object(trainer.world, trainer.step + math.floor(max(left, 0) * rate))
        train = dataclasses.replace(t, steps=max(steps, trainer.step))
        while cooldown_start(train) < trainer.step:  # a limit of seconds: cool down from now
            train = dataclasses.replace(train, steps=train.steps + 1)
        trainer.config = dataclasses.replace(trainer.config, train=train)
        self.unplanned = False
        if self.main:
            save_json(trainer.config, trainer.run_dir / "config.json")
            log.info(
                "the run's length is now %d steps (%.2f steps/s measured, %.1f minutes left): "
                "its learning rate cools down over the last %d",
                train.steps, rate, left / 60, train.steps - cooldown_start(train),
            )  # fmt: skip

    def _crossed(self, previous_images: int, every_kimg: float) -> bool:
        if every_kimg <= 0:
            return False
        every = every_kimg * 1000
        return math.floor(self.trainer.images_seen / every) > math.floor(previous_images / every)

    # ----------------------------------------------------------------- what leaves the loop

    def _progress_bar(self) -> tqdm:
        """Counts whichever limit is meant to end the run: wall clock, steps or images."""
        t = self.trainer.config.train
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
            disable=not (self.progress and self.main),
            dynamic_ncols=True,
        )

    def _bar_position(self, started: float) -> float:
        trainer, t = self.trainer, self.trainer.config.train
        if t.time_limit:
            return min(time.monotonic() - started, t.time_limit * 60)
        return trainer.step if t.steps else trainer.images_seen

    def _log(self, bar: tqdm) -> None:
        trainer = self.trainer
        trainer.read_back()
        window, trainer.window = trainer.window, []
        now, images = time.monotonic(), trainer.images_seen
        seconds = max(now - self.last_row[0], 1e-9)
        row = {
            "step": trainer.step,
            "kimg": images / 1000,
            "loss": sum(loss for loss, _ in window) / len(window),
            "lr": lr_at(trainer.step - 1, trainer.config.train),
            "grad_norm": window[-1][1],
            "images_per_s": (images - self.last_row[1]) / seconds,
            "ema_loss": trainer.ema_loss(),
            "time_s": trainer.elapsed,
        }
        self.last_row = (now, images)
        self.logbook.write(row)
        bar.set_postfix(step=trainer.step, kimg=f"{row['kimg']:.1f}", loss=f"{row['loss']:.4f}")

    def _evaluate(self) -> None:
        trainer = self.trainer
        trainer.read_back()
        net = trainer.ema or trainer.net
        scores = self.quality.measure(trainer.method.denoiser(net), trainer.device, trainer.guide())
        self.logbook.write({"step": trainer.step, "kimg": trainer.images_seen / 1000, **scores})

    def _pictures(self, final: bool = False) -> None:
        trainer = self.trainer
        trainer.read_back()
        if final:  # after the bar: a long sampler would otherwise look like a hang
            log.info(
                "drawing the final pictures: %d samples in %d sampler steps, and the GIF",
                self.pictures.count, self.pictures.plan.num_steps,
            )  # fmt: skip
        net = trainer.ema or trainer.net
        self.pictures.preview(net, trainer.images_seen, trainer.device, trainer.guide(), final)
        self.logbook.plot()

    def _result(self, stopped_by: str) -> TrainResult:
        trainer = self.trainer
        return TrainResult(
            trainer.run_dir, trainer.step, trainer.images_seen, stopped_by, trainer.last_loss
        )
