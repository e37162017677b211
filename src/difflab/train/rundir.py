"""The run directory: one owner at a time, never silently overwritten, and resumed only as the
run it is (the same settings and data)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import IO

from difflab.config import Config, first_difference, from_dict, upgrade, validate
from difflab.data import ImageSet
from difflab.errors import DifflabError
from difflab.io import check_output_folder, make_folder
from difflab.train.schedule import first_changed_rate, lr_at

log = logging.getLogger("difflab")

#: Settings a resume may change (``--set`` on ``train --resume``).
RESUMABLE = {
    "train.steps",
    "train.images",
    "train.time_limit",
    "train.device",
    "train.checkpoint_every",
    "train.keep_last",  # which checkpoints stay: nothing a step computes
    "train.snapshot_every",
    # the schedule too, where the steps already taken keep their rates (the trainer checks):
    # a constant rate's run can end in a cool-down (warm-up, stable, decay)
    "train.lr_schedule",
    "train.cooldown",
    "train.min_lr",
    # the data, and a distilled student's teacher and its guide, moved (the same images or
    # weights at a new path: the trainer compares the images, the student the teacher's digest)
    "data.source",
    "method.consistency.teacher",
    "method.consistency.teacher_guide",
}

#: ... and what else may differ between a run's config.json and the config its checkpoints were
#: trained with: names, the machine, how often it logs and previews, the data's path (the data
#: itself is compared), and the rest of the schedule (the trainer checks that the rates of the
#: steps taken stay).
MAY_DIFFER = RESUMABLE | {
    "preset", "description", "version", "world_size", "train.accumulation",
    "train.sample_every_kimg", "train.num_preview", "train.log_every", "train.eval_every_kimg",
    "train.eval_num", "train.eval_ref", "train.precision", "train.compile", "train.compile_mode",
    "train.compile_layout", "train.channels_last", "train.fused_optimizer", "train.lr",
    "train.warmup_steps", "train.round_steps", "train.round_decay", "train.cosine_steps",
}  # fmt: skip


def _absolute_paths(config: Config) -> Config:
    """What a run reads is stored as absolute paths, so that --resume and distill find it from
    any working directory: a folder given as the data, a student's teacher and its guide, the
    reference statistics of its FID points."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    if config.data.source.strip().lower() != "cifar10":
        data = dataclasses.replace(config.data, source=absolute(config.data.source))
        config = dataclasses.replace(config, data=data)
    c = config.method.consistency
    c = dataclasses.replace(c, teacher=absolute(c.teacher), teacher_guide=absolute(c.teacher_guide))
    train = dataclasses.replace(config.train, eval_ref=absolute(config.train.eval_ref))
    method = dataclasses.replace(config.method, consistency=c)
    return dataclasses.replace(config, method=method, train=train)


def checked_config(config: object) -> Config:
    """A config as training takes it, from Python as from the command line: a ``Config`` whose
    values have their types (read back through its dict) and limits (``validate``), and whose
    paths are absolute."""
    if not isinstance(config, Config):
        raise DifflabError(
            f"config must be a difflab Config (difflab.load_preset(...)), got {type(config).__name__}"
        )
    return _absolute_paths(validate(from_dict(config.to_dict())))


def data_record(data: ImageSet) -> dict[str, object]:
    """What a run trained on, as its checkpoints record it: the number of images and a digest
    of their pixels and labels (a moved folder is the same data; an added image is not)."""
    digest = hashlib.sha256(data.images.contiguous().numpy().data)
    digest.update(data.labels.contiguous().numpy().data)
    return {"images": len(data.images), "digest": digest.hexdigest()[:16]}


def check_same_run(
    run_dir: Path, metadata: dict[str, str], config: Config, data: dict[str, object]
) -> None:
    """A resume goes on with the run its newest checkpoint (``metadata``) was trained as: the
    same settings but those in ``MAY_DIFFER``, and the same data."""
    advice = f"or start a new run from its weights with --init {run_dir}"
    trained, before = _read(metadata, "data"), _read(metadata, "config")
    try:  # a damaged record is skipped: loading the checkpoint will say what is wrong
        before = from_dict(upgrade(before)).to_dict() if isinstance(before, dict) else None
    except DifflabError:
        before = None
    differs = before and first_difference(before, config.to_dict(), MAY_DIFFER)
    if differs:
        key, old, new = differs
        raise DifflabError(
            f"{run_dir}/config.json differs from the config its checkpoints were trained with "
            f"({key}: {old!r} -> {new!r}); restore it, {advice}"
        )
    if not isinstance(trained, dict) or trained.keys() != data.keys() or trained == data:
        return
    if trained["images"] != data["images"]:
        raise DifflabError(
            f"the data is not what {run_dir} was trained on ({trained['images']} images -> "
            f"{data['images']}): resume with the same images, {advice}"
        )
    # The same count, other pixels: changed images, or the same files decoded by another
    # Pillow or libjpeg. Said, not refused (every rank sees the same count, so all go on).
    log.warning(
        "the images' pixels differ from those %s was trained on (the same %d images): changed "
        "files, or another image decoder; the resume goes on with them",
        run_dir,
        data["images"],
    )


def _read(metadata: dict[str, str], key: str) -> object:
    """A JSON record of a checkpoint's metadata; None when absent or unreadable."""
    try:
        return json.loads(metadata[key])
    except (KeyError, TypeError, ValueError):
        return None


def check_past_rates(run_dir: Path, trained: dict, config: Config, step: int) -> None:
    """A resumed run is the run its config describes: a new length or schedule may not change
    the learning rate of a step already taken (``trained``: the resumed checkpoint's config)."""
    before, after = from_dict(upgrade(trained)).train, config.train
    changed = first_changed_rate(before, after, step)
    if changed is not None:
        raise DifflabError(
            f"resuming {run_dir} so would change the learning rate of a step it has "
            f"taken (step {changed:,}: {lr_at(changed, before):.3g} -> "
            f"{lr_at(changed, after):.3g}): keep its length and schedule, or start a new run "
            f"from its weights with --init {run_dir}"
        )


class RunLock:
    """An exclusive ``flock`` on RUN_DIR/.lock; the kernel releases it when the process dies."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.handle: IO[str] | None = None

    def __enter__(self) -> RunLock:
        make_folder(self.path.parent, "run directory")
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise DifflabError(
                f"{self.path.parent} is in use by {owner}; wait for it to finish or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may use an empty or missing folder, never one that holds another run."""
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        raise DifflabError(
            f"{run_dir} already holds a run; continue it with difflab train --resume {run_dir} or choose "
            "another --out"
        )
    check_output_folder(run_dir, "--out")


def check_existing_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise DifflabError(f"{run_dir} is a file, not a run directory")
    if not run_dir.is_dir():
        raise DifflabError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.json").is_file():
        raise DifflabError(f"{run_dir} has no config.json: it is not a difflab run directory")
    check_output_folder(run_dir, "--resume")  # a run goes on in its own folder
