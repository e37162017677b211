"""``difflab train``: a config from a preset and flags (or a run's own, to resume), then the
trainer's loop."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from difflab.cli_eval import DEVICE_HELP
from difflab.config import NetworkConfig, TrainConfig, parse_value
from difflab.errors import DifflabError
from difflab.limits import Bounded

log = logging.getLogger("difflab")
SEED = Bounded.like(TrainConfig, "seed")


def _train_option(name: str, **changes) -> Bounded:
    return Bounded.like(TrainConfig, name, **changes)


def _train_config(args: argparse.Namespace):
    """Preset, then --method / --network, then the flags, then --set: later wins."""
    from difflab.config import SamplerConfig, apply_overrides, load_preset
    from difflab.train.rundir import checked_config

    config = load_preset(args.preset)
    if args.method:
        config.method.name = args.method
        if not args.sampler:  # the preset's sampler belongs to its method: use the new one's
            config.sampler = SamplerConfig()
    if args.network:
        config.network.name = args.network
    if lengths_named(args):
        # A length on the command line (flag or --set) is the run's length: the preset's own
        # (flow-cpu's 200,000 steps) would otherwise outlast a time limit and keep a cool-down
        # away.
        config.train.steps, config.train.images, config.train.time_limit = 0, 0, 0.0
    overrides = flag_overrides(args, *RUN_FLAGS, "data.source", "data.class_name", "sampler.name")
    config = checked_config(apply_overrides(config, overrides + args.set))
    if config.data.class_names or config.network.unet.num_classes:  # by --set or a preset
        raise DifflabError(
            "data.class_names and network.unet.num_classes are learned from the data's class "
            "folders, not set: drop them (data.conditional=true learns them; --class picks one)"
        )
    return config


def setting_key(item: str) -> str:
    """The setting a ``--set KEY=VALUE`` names."""
    return item.partition("=")[0].strip()


def lengths_named(args: argparse.Namespace) -> set[str]:
    """Which of the run's lengths (steps, images, time_limit) the command line names, by flag
    or by --set."""
    set_keys = {setting_key(item) for item in args.set}
    return {name for name in ("steps", "images", "time_limit")
            if getattr(args, name) is not None or f"train.{name}" in set_keys}  # fmt: skip


#: The config key of each command-line option (args.<name> holds its value).
FLAG_KEYS = {
    "data.source": "data",
    "data.class_name": "class_name",
    "sampler.name": "sampler",
    "train.steps": "steps",
    "train.images": "images",
    "train.time_limit": "time_limit",
    "train.batch_size": "batch_size",
    "train.seed": "seed",
    "train.device": "device",
    "train.checkpoint_every": "checkpoint_every",
}
RUN_FLAGS = [key for key in FLAG_KEYS if key.startswith("train.")]


def flag_overrides(args: argparse.Namespace, *keys: str) -> list[str]:
    """``key=value`` overrides of the options given, for these config keys."""
    values = {key: getattr(args, FLAG_KEYS[key]) for key in keys}
    return [f"{key}={_literal(value)}" for key, value in values.items() if value is not None]


def _literal(value: object) -> str:
    """``value`` as override text that parses back to it: quoted, so that a folder named 1e3
    stays a string, unless the quoting cannot say it (a path that is not valid UTF-8)."""
    text = json.dumps(value)
    return text if parse_value(text) == value else str(value)


def _resume_config(args: argparse.Namespace):
    """The run's own config; only its length, device and (keeping the rates of the steps taken)
    learning-rate schedule may change when resuming."""
    from difflab.config import apply_overrides, load_json
    from difflab.train.rundir import RESUMABLE, check_existing_run_dir, checked_config

    run_dir = Path(args.resume)
    check_existing_run_dir(run_dir)
    config = load_json(run_dir / "config.json")
    changed = {
        "--preset": args.preset_given,
        "--sampler": args.sampler and args.sampler != config.sampler.name,
        "--class": args.class_name,
        "--batch-size": args.batch_size,
        "--seed": args.seed,
        "--method": args.method and args.method != config.method.name,
        "--network": args.network and args.network != config.network.name,
        "--out": args.out and Path(args.out) != run_dir,
        "--init": args.init,
    }
    for flag, value in changed.items():
        if value:
            raise DifflabError(
                f"{flag} cannot change when resuming {run_dir}; only --steps, --images, "
                "--time-limit, --device, --checkpoint-every and --data (the same images, moved) "
                "can (start a new run for the rest; sample and eval take --sampler)"
            )
    for item in args.set:
        if setting_key(item) not in RESUMABLE:
            raise DifflabError(
                f"--set {item}: only {', '.join(sorted(RESUMABLE))} can change on --resume"
            )
    overrides = flag_overrides(args, *sorted(RESUMABLE & FLAG_KEYS.keys()))
    named = lengths_named(args)
    if named and "time_limit" not in named:  # a new length: the last time limit was its own
        overrides.append("train.time_limit=0")
    return checked_config(apply_overrides(config, overrides + args.set)), run_dir


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        config, run_dir = _resume_config(args)
    else:
        config = _train_config(args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{config.preset}-{stamp}")
    init = Path(args.init) if args.init else None
    if init is not None and init.exists():  # (distill checks its teacher's weights itself)
        _check_init(init, config)
    given = args.class_name is not None or any(
        setting_key(i) == "data.class_name" for i in args.set
    )
    class_is_default = not args.resume and not given
    return run_training(config, run_dir, args, init=init, class_is_default=class_is_default)


def _check_init(init: Path, config) -> None:
    """--init's weights fit this run's network (one line naming the first setting that differs,
    before the data loads); another method's are a weak start, said so."""
    from difflab.config import first_difference
    from difflab.train.checkpoint import stored_config

    source = stored_config(init)
    there, here = ({"network": dataclasses.asdict(weight_shapes(c.network)),
                    "data": {"image_size": c.data.image_size}} for c in (source, config))  # fmt: skip
    unet = config.network.name == "unet"
    sizeless = unet and not config.network.unet.attention_resolutions  # weights fit any size
    # the classes are learned from the data later; the weights' load checks them
    ignore = {"network.unet.num_classes", *(["data.image_size"] if sizeless else [])}
    differs = first_difference(there, here, ignore)
    if differs is not None:
        key, old, new = differs
        raise DifflabError(
            f"--init {init} holds another network ({key}: {old!r} there, {new!r} here); use its "
            "network settings, or drop --init"
        )
    if source.method.name != config.method.name:
        log.warning(
            "--init %s was trained as %s: its weights learned another task than %s's, a weak start",
            init,
            source.method.name,
            config.method.name,
        )


def weight_shapes(network: NetworkConfig) -> NetworkConfig:
    """The settings that make a network's weights: all but its dropout, which a student may
    change (improved CT and ECT tune consistency models with more of it than their teachers)."""
    return dataclasses.replace(network, unet=dataclasses.replace(network.unet, dropout=0.0))


def run_training(
    config, run_dir: Path, args: argparse.Namespace, *, init: Path | None, class_is_default: bool
) -> int:
    """Check everything that can be wrong before touching data or disk, load the data, train."""
    from difflab.classes import check_learned
    from difflab.data import load_images
    from difflab.devices import resolve_device
    from difflab.plans import build_sampler
    from difflab.registry import build_method, build_network
    from difflab.train.distributed import check_environment
    from difflab.train.loop import Interrupted, train
    from difflab.train.rundir import check_new_run_dir
    from difflab.train.schedule import can_lengthen

    resume = bool(getattr(args, "resume", None))
    method = build_method(config)
    build_network(config)
    build_sampler(method, config.sampler)
    resolve_device(config.train.device)
    follower = check_environment() and int(os.environ["RANK"]) > 0  # torchrun's variables
    if follower:  # rank 0 speaks for the run; the others say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    if not resume:
        check_new_run_dir(run_dir)
        source = Path(config.data.source).expanduser()
        if source.is_dir() and run_dir.resolve().is_relative_to(source.resolve()):
            raise DifflabError(
                f"--out {run_dir} is inside the data folder {source}: its pictures would become "
                "training images; choose an --out outside it"
            )
    if init is not None and not init.exists():
        raise DifflabError(
            f"--init {init} does not exist; give an exported .safetensors or a run directory"
        )
    data = load_images(
        config.data.source,
        config.data.class_name,
        config.data.image_size,
        class_is_default=class_is_default,
    )
    if not data.class_names and config.data.class_name is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, class_name=None))
    check_learned(config, data.class_names, data.source)  # before the run's folder is made
    log.info("data: %s", data.source)  # where from, and how many images
    if len(data.images) < config.train.batch_size:
        log.warning(
            "the data set (%d images) is smaller than the batch (%d): %s",
            len(data.images),
            config.train.batch_size,
            "each step trains on all of it (train.batching = 'epochs')"
            if config.train.batching == "epochs"
            else "batches are drawn from it with replacement",
        )
    try:
        result = train(
            config,
            run_dir,
            resume=resume,
            init=init,
            data=data,
            progress=not (args.no_progress or args.quiet),  # -q: no bars or notes
        )
    except Interrupted as stop:
        if follower:
            return 128 + stop.signum
        print(
            f"difflab: stopped by {stop} at step {stop.result.step}; checkpoint saved. "
            f"Resume with: difflab train --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + stop.signum
    if follower:
        return 0
    if result.stopped_by == "already-done":
        cooled = not can_lengthen(config.train, result.step)
        print(
            f"{run_dir} already reached its length (step {result.step}, "
            f"{result.images_seen} images); "
            + (f"its rate has cooled down, so it cannot be lengthened: --init {run_dir} starts "
               "a new run from its weights" if cooled
               else "pass a larger --steps or --images to extend it")
        )  # fmt: skip
    else:
        print(
            f"trained {run_dir} to step {result.step} ({result.images_seen} images, "
            f"stopped by {result.stopped_by}, loss {result.loss:.4f}); pictures in {run_dir}/pictures"
        )
    return 0


def add_train_command(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model (or resume one)")
    train.add_argument(
        "--preset", default=None, help="preset name or .toml file (default: tutorial)"
    )
    train.add_argument(
        "--data",
        help="cifar10 (download) or an image folder (default: the preset's data.source, cifar10)",
    )
    train.add_argument("--class", dest="class_name", help="class name or index to train on")
    train.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    add_run_options(train)
    train.add_argument("--method", help="tutorial, ddpm, ddpm-cosine, flow, edm or consistency")
    train.add_argument("--network", help="tutorial, tutorial-keras or unet")
    train.add_argument(
        "--sampler",
        help="the run's sampler: its pictures', and sample's and eval's default (default: the "
        "preset's, or the method's with --method)",
    )
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run")
    train.add_argument(
        "--init", metavar="FILE", help="start from exported weights (or a run directory)"
    )
    train.set_defaults(func=cmd_train)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of a training run that train and distill share."""
    parser.add_argument("--steps", type=_train_option("steps", low=1), help="total optimizer steps")
    parser.add_argument("--images", type=_train_option("images", low=1), help="total images")
    parser.add_argument(
        "--time-limit",
        type=_train_option("time_limit", low_open=True),
        help="minutes of training in this invocation",
    )
    parser.add_argument(
        "--batch-size", type=_train_option("batch_size"), help="images per step, over all GPUs"
    )
    parser.add_argument("--seed", type=SEED, help="the run's seed: data order, noise, dropout")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument(
        "--checkpoint-every",
        type=_train_option("checkpoint_every"),
        help="steps between checkpoints",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config value"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
