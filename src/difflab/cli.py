"""The command line: parse, build, call. Every user mistake ends in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from difflab.config import SamplerConfig, TrainConfig
from difflab.errors import DifflabError, one_line, shorten
from difflab.limits import MAX_IMAGES, MAX_SAMPLE_BATCH, Bounded, Limits

log = logging.getLogger("difflab")
EXIT_ERROR = 2
GIF_IMAGES = 16  # images in sample's reverse-process.gif
# Numeric options: parsed and range-checked by the limits their config fields declare.
SEED = Bounded.like(TrainConfig, "seed")
SAMPLER_STEPS = Bounded.like(SamplerConfig, "steps", low=1)


def _train_option(name: str, **changes) -> Bounded:
    return Bounded.like(TrainConfig, name, **changes)


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes in one line instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DifflabError(f"{message} (see {self.prog} --help)")


# --------------------------------------------------------------------------- train


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
    flags = {
        "data.source": args.data,
        "data.class_name": args.class_name,
        "train.steps": args.steps,
        "train.images": args.images,
        "train.time_limit": args.time_limit,
        "train.batch_size": args.batch_size,
        "train.seed": args.seed,
        "train.device": args.device,
        "train.checkpoint_every": args.checkpoint_every,
        "sampler.name": args.sampler,
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return validate(apply_overrides(config, overrides + args.set))


RESUMABLE = {
    "train.steps",
    "train.images",
    "train.time_limit",
    "train.device",
    "train.checkpoint_every",
}


def _resume_config(args: argparse.Namespace):
    """The run's own config; only its length (and device) may change when resuming."""
    from difflab.config import apply_overrides, load_json, validate
    from difflab.train.rundir import check_existing_run_dir

    run_dir = Path(args.resume)
    check_existing_run_dir(run_dir)
    config = load_json(run_dir / "config.json")
    changed = {
        "--preset": args.preset != "tutorial" and args.preset_given,
        "--data": args.data,
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
                "--time-limit and --device can (start a new run for the rest)"
            )
    for item in args.set:
        if item.partition("=")[0].strip() not in RESUMABLE:
            raise DifflabError(
                f"--set {item}: only {', '.join(sorted(RESUMABLE))} can change on --resume"
            )
    flags = {
        "train.steps": args.steps,
        "train.images": args.images,
        "train.time_limit": args.time_limit,
        "train.device": args.device,
        "train.checkpoint_every": args.checkpoint_every,
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return validate(apply_overrides(config, overrides + args.set)), run_dir


def cmd_train(args: argparse.Namespace) -> int:
    from difflab.data import load_images
    from difflab.devices import resolve_device
    from difflab.registry import build_method, build_network, build_sampler
    from difflab.train.rundir import check_new_run_dir
    from difflab.train.trainer import Interrupted, train

    if args.resume:
        config, run_dir = _resume_config(args)
    else:
        config = _train_config(args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{config.preset}-{stamp}")
    # Build everything that can be wrong with the config before touching data or disk.
    method = build_method(config)
    build_network(config)
    build_sampler(method, config.sampler)
    resolve_device(config.train.device)
    if not args.resume:
        check_new_run_dir(run_dir)
    if args.init and not Path(args.init).exists():
        raise DifflabError(
            f"--init {args.init} does not exist; give an exported .safetensors or a run directory"
        )
    class_is_default = not args.resume and args.class_name is None
    data = load_images(
        config.data.source,
        config.data.class_name,
        config.data.image_size,
        class_is_default=class_is_default,
    )
    if not data.class_names and config.data.class_name is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, class_name=None))
    log.info("data: %d images from %s", len(data.images), data.source)
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
            resume=bool(args.resume),
            init=Path(args.init) if args.init else None,
            data=data,
            progress=not args.no_progress,
        )
    except Interrupted as stop:
        print(
            f"difflab: stopped by {stop} at step {stop.result.step}; checkpoint saved. "
            f"Resume with: difflab train --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + stop.signum
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


# --------------------------------------------------------------------------- sample


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.api import load_run
    from difflab.io import check_output_folder
    from difflab.sampling import strip_indices
    from difflab.viz import save_gif, save_grid, save_images, save_strip

    out = check_output_folder(Path(args.out), "--out")
    run = load_run(
        args.run_dir, checkpoint=args.checkpoint, ema=not args.no_ema, device=args.device
    )
    options = {k: v for k, v in (("eta", args.eta), ("grid", args.grid)) if v is not None}
    plan = run.plan(args.sampler, args.steps, **options)
    record = GIF_IMAGES if args.strip or args.gif else 0
    written, evaluations = 0, 0
    first = None
    for start in range(0, args.num, args.batch_size):
        count = min(args.batch_size, args.num - start)
        result = run.generate(
            count, args.seed, plan=plan, batch_size=count, start=start, record=record
        )
        record = 0  # the first batch's first images only
        save_images(result.images, out, start_index=start)
        written += count
        evaluations = result.evaluations
        if start == 0:
            first = result
        print(f"\rsampled {written}/{args.num}", end="", file=sys.stderr)
    print(file=sys.stderr)
    save_grid(first.images[:64], out / "grid.png")
    if args.strip:
        save_strip(first.frames[1:, 0][strip_indices(plan.num_steps)], out / "strip.png")
    if args.gif:
        save_gif(first.frames, out / "reverse-process.gif")
    print(
        f"wrote {written} images to {out} (sampler {plan.name}, {plan.num_steps} steps, "
        f"{evaluations} network evaluations per image, step {run.step} weights)"
    )
    return 0


# --------------------------------------------------------------------------- presets, export


def cmd_presets(args: argparse.Namespace) -> int:
    from difflab.config import load_preset, preset_names
    from difflab.models import count_parameters, forward_gflops
    from difflab.registry import build_network

    rows = []
    for name in preset_names():
        config = load_preset(name)
        net = build_network(config)
        gflops = forward_gflops(net, 3, config.data.image_size)
        rows.append(
            (
                name,
                config.method.name,
                config.network.name,
                count_parameters(net),
                gflops,
                config.description,
            )
        )
    print(
        f"{'preset':<18} {'method':<12} {'network':<15} {'parameters':>11} {'GFLOP/img':>10}  description"
    )
    for name, method, network, params, gflops, description in rows:
        print(f"{name:<18} {method:<12} {network:<15} {params:>11d} {gflops:>10.3f}  {description}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from difflab.api import load_run
    from difflab.io import atomic_write, check_output_file

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise DifflabError(f"--out {out}: the export file must end in .safetensors")
    check_output_file(out, "--out")
    run = load_run(args.run_dir, checkpoint=args.checkpoint, ema=not args.raw, device="cpu")
    weights = {k: v.contiguous() for k, v in run.net.state_dict().items()}
    metadata = {
        "config": run.config.to_json(),
        "step": str(run.step),
        "weights": "raw" if args.raw else "ema",
    }
    atomic_write(out, lambda tmp: save_file(weights, str(tmp), metadata=metadata))
    print(f"exported step {run.step} ({metadata['weights']} weights) to {out}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="difflab", description="Train, sample and measure small image diffusion models."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (or resume one)")
    train.add_argument(
        "--preset", default=None, help="preset name or .toml file (default: tutorial)"
    )
    train.add_argument("--data", help="cifar10 (download) or an image folder")
    train.add_argument("--class", dest="class_name", help="class name or index to train on")
    train.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    train.add_argument("--steps", type=_train_option("steps", low=1), help="total optimizer steps")
    train.add_argument("--images", type=_train_option("images", low=1), help="total images")
    train.add_argument(
        "--time-limit",
        type=_train_option("time_limit", low_open=True),
        help="minutes of training in this invocation",
    )
    train.add_argument("--batch-size", type=_train_option("batch_size"))
    train.add_argument("--seed", type=SEED)
    train.add_argument("--method", help="tutorial, ddpm, ddpm-cosine, flow or edm")
    train.add_argument("--network", help="tutorial, tutorial-keras or unet")
    train.add_argument("--sampler", help="sampler for the pictures (default: the method's)")
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    train.add_argument(
        "--checkpoint-every", type=_train_option("checkpoint_every"), help="steps between them"
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config value"
    )
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run")
    train.add_argument(
        "--init", metavar="FILE", help="start from exported weights (or a run directory)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="sample images from a run")
    sample.add_argument("run_dir", help="run directory or exported .safetensors")
    sample.add_argument("--num", type=Bounded(int, Limits(low=1, high=MAX_IMAGES)), default=16)
    sample.add_argument("--out", required=True, help="folder for 00000.png, ... and grid.png")
    sample.add_argument("--seed", type=SEED, default=0)
    sample.add_argument(
        "--batch-size", type=Bounded(int, Limits(low=1, high=MAX_SAMPLE_BATCH)), default=64
    )
    sample.add_argument(
        "--sampler", help="tutorial, ancestral, ddim, euler, heun, edm, edm-stochastic, dpm++2m"
    )
    sample.add_argument("--steps", type=SAMPLER_STEPS, help="sampler steps")
    sample.add_argument(
        "--eta", type=Bounded.like(SamplerConfig, "eta"), help="DDIM eta (0 deterministic)"
    )
    sample.add_argument(
        "--grid", choices=["default", "edm"], help="time grid (edm: rho = 7 spacing)"
    )
    sample.add_argument("--checkpoint", help="a checkpoint folder of the run (default: newest)")
    sample.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    sample.add_argument("--strip", action="store_true", help="also write strip.png of the progress")
    sample.add_argument("--gif", action="store_true", help="also write reverse-process.gif")
    sample.add_argument("--device", default="auto")
    sample.set_defaults(func=cmd_sample)

    presets = sub.add_parser("presets", help="list presets with parameter counts")
    presets.set_defaults(func=cmd_presets)

    export = sub.add_parser("export", help="write a run's weights and config to one .safetensors")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    export.add_argument("--checkpoint", help="a checkpoint folder of the run (default: newest)")
    export.set_defaults(func=cmd_export)

    from difflab.cli_eval import add_eval_commands

    add_eval_commands(sub)
    return parser


MESSAGE_LIMIT = 1000  # characters of an error message; a compiler's 200 KB stays a few lines


def _one_line(error: BaseException) -> str:
    """The message on one line (line breaks escaped) and at most ``MESSAGE_LIMIT`` long."""
    return shorten(one_line(str(error)), MESSAGE_LIMIT)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as one line that says whose it is (not difflab's, no source line)."""
    parts = Path(filename).parts
    owner = (
        parts[parts.index("site-packages") + 1] if "site-packages" in parts else Path(filename).stem
    )
    text = shorten(one_line(str(message).strip()), 200)
    print(f"difflab: note: {owner} warned ({category.__name__}): {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="difflab: %(message)s", force=True)
    with warnings.catch_warnings():  # restores the warning display when main returns
        if not debug:
            warnings.showwarning = _show_warning
        return _main(argv, debug)


def _main(argv: list[str], debug: bool) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.quiet:
            logging.getLogger().setLevel(logging.WARNING)
        if getattr(args, "command", None) == "train":
            args.preset_given = args.preset is not None
            args.preset = args.preset or "tutorial"
        return args.func(args)
    except DifflabError as error:
        if debug:
            raise
        print(f"difflab: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the last line of defence: still one line, unless --debug
        if debug:
            raise
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            print(
                "difflab: error: out of memory; lower --batch-size or raise train.accumulation",
                file=sys.stderr,
            )
        else:
            print(
                f"difflab: error: unexpected {type(error).__name__}: {_one_line(error)} (rerun "
                "with --debug for the traceback and please report it)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
