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
from difflab.config import ConsistencyMethod, NetworkConfig, TrainConfig, parse_value
from difflab.errors import DifflabError
from difflab.limits import Bounded

log = logging.getLogger("difflab")
SEED = Bounded.like(TrainConfig, "seed")


def _train_option(name: str, **changes) -> Bounded:
    return Bounded.like(TrainConfig, name, **changes)


def _train_config(args: argparse.Namespace):
    """Preset, then --method / --network, then the flags, then --set: later wins."""
    from difflab.config import SamplerConfig, apply_overrides, load_preset, validate

    config = load_preset(args.preset)
    if args.method:
        config.method.name = args.method
        if not args.sampler:  # the preset's sampler belongs to its method: use the new one's
            config.sampler = SamplerConfig()
    if args.network:
        config.network.name = args.network
    lengths = ("steps", "images", "time_limit")
    set_keys = {_key(item) for item in args.set}
    if any(getattr(args, n) is not None or f"train.{n}" in set_keys for n in lengths):
        # A length on the command line (flag or --set) is the run's length: the preset's own
        # (flow-cpu's 200,000 steps) would otherwise outlast a time limit and keep a cool-down
        # away.
        config.train.steps, config.train.images, config.train.time_limit = 0, 0, 0.0
    overrides = _flags(args, *RUN_FLAGS, "data.source", "data.class_name", "sampler.name")
    config = _absolute_paths(validate(apply_overrides(config, overrides + args.set)))
    if config.data.class_names or config.network.unet.num_classes:  # by --set or a preset
        raise DifflabError(
            "data.class_names and network.unet.num_classes are learned from the data's class "
            "folders, not set: drop them (data.conditional=true learns them; --class picks one)"
        )
    return config


def _key(item: str) -> str:
    """The setting a ``--set KEY=VALUE`` names."""
    return item.partition("=")[0].strip()


def _absolute_paths(config):
    """What a run reads is stored as absolute paths, so that --resume and distill find it from
    any working directory: a folder given as the data, a student's teacher and its guide."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    if config.data.source.strip().lower() != "cifar10":
        data = dataclasses.replace(config.data, source=absolute(config.data.source))
        config = dataclasses.replace(config, data=data)
    c = config.method.consistency
    c = dataclasses.replace(c, teacher=absolute(c.teacher), teacher_guide=absolute(c.teacher_guide))
    return dataclasses.replace(config, method=dataclasses.replace(config.method, consistency=c))


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


def _flags(args: argparse.Namespace, *keys: str) -> list[str]:
    """``key=value`` overrides of the options given, for these config keys."""
    values = {key: getattr(args, FLAG_KEYS[key]) for key in keys}
    return [f"{key}={_literal(value)}" for key, value in values.items() if value is not None]


def _literal(value: object) -> str:
    """``value`` as override text that parses back to it: quoted, so that a folder named 1e3
    stays a string, unless the quoting cannot say it (a path that is not valid UTF-8)."""
    text = json.dumps(value)
    return text if parse_value(text) == value else str(value)


#: Who teaches a student: set by distill from its RUN_DIR, --guide and --guidance only.
TEACHER_SETTINGS = {
    "method.consistency.teacher",
    "method.consistency.teacher_guide",
    "method.consistency.teacher_guidance",
    "method.consistency.teacher_digest",
}


def _resume_config(args: argparse.Namespace):
    """The run's own config; only its length, device and (keeping the rates of the steps taken)
    learning-rate schedule may change when resuming."""
    from difflab.config import apply_overrides, load_json, validate
    from difflab.train.rundir import RESUMABLE, check_existing_run_dir

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
        if _key(item) not in RESUMABLE:
            raise DifflabError(
                f"--set {item}: only {', '.join(sorted(RESUMABLE))} can change on --resume"
            )
    overrides = _flags(args, *sorted(RESUMABLE & FLAG_KEYS.keys()))
    return _absolute_paths(validate(apply_overrides(config, overrides + args.set))), run_dir


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
    given = args.class_name is not None or any(_key(i) == "data.class_name" for i in args.set)
    class_is_default = not args.resume and not given
    return _run_training(config, run_dir, args, init=init, class_is_default=class_is_default)


#: What distill changes in the teacher's settings (``--set`` overrides either): the levels of
#: the teacher's ODE steps, and the learning rate for a student that starts from trained weights.
DISTILL_LEVELS, FINE_TUNE_LR = 18, 1e-4


def cmd_distill(args: argparse.Namespace) -> int:
    """A consistency model from a diffusion run: its data, network and training settings, the
    run as the teacher (or, with --no-teacher, consistency training started from its weights)."""
    from difflab.config import SamplerConfig, apply_overrides, validate
    from difflab.registry import CONSISTENCY_BASES, build_network, teacher_models
    from difflab.train.checkpoint import stored_config, weights_digest
    from difflab.train.guides import carries_guide, check_weaker, load_guide, own_guide_folder

    teacher = Path(args.run_dir)
    base = stored_config(teacher)
    if base.method.name == "consistency":
        raise DifflabError(f"{teacher} is a consistency model already; distil a diffusion run")
    # The student is built on the teacher's process and parameterization where it can be, so
    # the teacher's weights are its exact start; on EDM's otherwise (a DDPM run).
    options = dataclasses.replace(
        base.method.consistency,
        teacher="" if args.no_teacher else str(teacher.resolve()),
        base=base.method.name if base.method.name in CONSISTENCY_BASES else "edm",
    )
    if args.no_teacher and (args.guide or args.guidance is not None):
        raise DifflabError("--guide and --guidance guide the teacher's ODE: drop --no-teacher")
    if not args.no_teacher:  # distillation's fixed N = 18 on CIFAR-10 (Song et al. 2023, App. C)
        options = dataclasses.replace(
            options, start_levels=DISTILL_LEVELS, max_levels=DISTILL_LEVELS
        )
        # ... of the teacher's sampler: autoguided by its own guide if it has one
        guide, sampler = own_guide_folder(teacher, base, "distilling"), base.sampler
        if teacher.is_file() and base.sampler.guide_at:  # an export: the guide it carries
            guide = teacher if carries_guide(teacher) else None
            if guide is None:
                log.warning("%s carries no guide: distilling without autoguidance", teacher)
        if args.guide:  # refused here, in one line, unless a weaker model of the teacher's kind
            guide, sampler = Path(args.guide), base.sampler.with_guide()
            load_guide(guide, base, build_network)
        if args.guidance is not None and guide is None:
            raise DifflabError("--guidance weighs the teacher's autoguidance: name a --guide")
        guidance = sampler.guidance if args.guidance is None else args.guidance
        if args.guide and guidance == 1:
            raise DifflabError(
                "--guidance 1 turns the guide off: drop --guide, or weigh it by w > 1"
            )
        if guide is not None and guidance != 1:
            options = dataclasses.replace(
                options, teacher_guide=str(guide.resolve()), teacher_guidance=guidance
            )
    method = dataclasses.replace(base.method, name="consistency", consistency=options)
    length = dataclasses.replace(base.train, steps=0, images=0, time_limit=0.0)  # the flags say
    if not args.from_scratch:  # fine-tuning trained weights: improved CT's CIFAR-10 rate
        length = dataclasses.replace(
            length, lr=FINE_TUNE_LR, warmup_steps=0, lr_schedule="constant"
        )
    config = dataclasses.replace(
        base,
        preset=f"{base.preset}-consistency",
        description=f"consistency model of {teacher}",
        method=method,
        sampler=SamplerConfig(),
        train=length,
    )
    named = sorted({_key(item) for item in args.set} & TEACHER_SETTINGS)
    if named:  # the teacher is RUN_DIR, its guide --guide: both checked above
        raise DifflabError(
            f"--set {named[0]}: distill's RUN_DIR names the teacher, --guide and --guidance its "
            "guide; drop the --set"
        )
    overrides = _flags(args, *RUN_FLAGS, "data.source")
    config = _absolute_paths(validate(apply_overrides(config, overrides + args.set)))
    init = None if args.from_scratch else teacher
    if init is not None and _weight_shapes(config.network) != _weight_shapes(base.network):
        raise DifflabError(
            "the student starts from the teacher's weights, so its network cannot change "
            "(but for network.unet.dropout); add --from-scratch for a student network of its own"
        )
    if config.data.image_size != base.data.image_size:
        raise DifflabError(
            f"{teacher} makes {base.data.image_size}x{base.data.image_size} images; drop "
            "data.image_size (a student learns at its teacher's size)"
        )
    if config.method.name != "consistency":
        raise DifflabError("distill makes a consistency model: drop --set method.name")
    carries = base.method.name in CONSISTENCY_BASES  # the teacher's weights carry over
    if init is not None and carries and config.method.consistency.base != options.base:
        raise DifflabError(
            f"{teacher} is {base.method.name}: its student is built on {base.method.name} (its "
            "weights mean nothing on another base): drop --set method.consistency.base, or add "
            "--from-scratch"
        )
    if init is not None and not carries:
        log.warning(
            "%s is a %s run: its network was trained on other input scalings than the "
            "consistency function's, so its weights are a weak start (docs/methods.md 2.8); "
            "a flow or edm run is a teacher whose weights carry over",
            teacher,
            base.method.name,
        )
    c = config.method.consistency
    if c.teacher:  # what a resume checks a moved teacher (and its guide) against
        net, weak, _ = teacher_models(c)
        check_weaker(net, weak, c.teacher_guide, "teacher")
        c = dataclasses.replace(c, teacher_digest=weights_digest(net, *filter(None, [weak])))
        method = dataclasses.replace(config.method, consistency=c)
        config = dataclasses.replace(config, method=method)
    return _run_training(config, Path(args.out), args, init=init, class_is_default=True)


def _check_init(init: Path, config) -> None:
    """--init's weights fit this run's network (one line naming the first setting that differs,
    before the data loads); another method's are a weak start, said so."""
    from difflab.config import flatten
    from difflab.train.checkpoint import stored_config

    source = stored_config(init)
    there = flatten(dataclasses.asdict(_weight_shapes(source.network)), "network.")
    here = flatten(dataclasses.asdict(_weight_shapes(config.network)), "network.")
    unet = config.network.name == "unet"
    if not unet or config.network.unet.attention_resolutions:  # weights made for one size
        there["data.image_size"] = source.data.image_size
        here["data.image_size"] = config.data.image_size
    learned = "network.unet.num_classes"  # from the data, later: the weights' load checks it
    key = next((k for k in sorted(here) if k != learned and there.get(k) != here[k]), None)
    if key is not None:
        raise DifflabError(
            f"--init {init} holds another network ({key}: {there.get(key)!r} there, "
            f"{here[key]!r} here); use its network settings, or drop --init"
        )
    if source.method.name != config.method.name:
        log.warning(
            "--init %s was trained as %s: its weights learned another task than %s's, a weak start",
            init,
            source.method.name,
            config.method.name,
        )


def _weight_shapes(network: NetworkConfig) -> NetworkConfig:
    """The settings that make a network's weights: all but its dropout, which a student may
    change (improved CT and ECT tune consistency models with more of it than their teachers)."""
    return dataclasses.replace(network, unet=dataclasses.replace(network.unet, dropout=0.0))


def _run_training(
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
            "the data set (%d images) is smaller than the batch (%d)",
            len(data.images),
            config.train.batch_size,
        )
    try:
        result = train(
            config,
            run_dir,
            resume=resume,
            init=init,
            data=data,
            progress=not (args.no_progress or args.quiet),  # -q: only warnings and errors
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
        print(
            f"{run_dir} already reached its length (step {result.step}, "
            f"{result.images_seen} images); pass a larger --steps to extend it"
        )
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
    train.add_argument("--data", help="cifar10 (download) or an image folder")
    train.add_argument("--class", dest="class_name", help="class name or index to train on")
    train.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    _add_run_options(train)
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


def add_distill_command(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser(
        "distill", help="a one- or few-step consistency model from a trained diffusion run"
    )
    distill.add_argument("run_dir", help="the teacher: a diffusion run directory or export")
    distill.add_argument("--out", required=True, help="the student's run directory")
    distill.add_argument("--data", help="the images to distil on (default: the teacher's)")
    distill.add_argument(
        "--method", choices=["consistency"], default="consistency", help="consistency models"
    )
    distill.add_argument(
        "--no-teacher",
        action="store_true",
        help="consistency training from the run's weights instead (ECT-style fine-tuning)",
    )
    distill.add_argument(
        "--from-scratch", action="store_true", help="do not start from the run's weights"
    )
    distill.add_argument(
        "--guide",
        help="autoguide the teacher's ODE by this weaker model of its kind (e.g. an earlier "
        "checkpoint folder of the teacher run; default: the teacher's own guide, if its "
        "sampler has one): the student learns the guided sampler",
    )
    distill.add_argument(
        "--guidance",
        type=Bounded.like(ConsistencyMethod, "teacher_guidance"),
        help="the teacher's autoguidance weight w (default: its sampler's, or 2 where that is 1 "
        "and --guide names a guide; 1 = unguided)",
    )
    _add_run_options(distill)
    distill.set_defaults(func=cmd_distill)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
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
