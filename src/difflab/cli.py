"""The command line: parse, build, call. Every user mistake ends in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from difflab.config import SamplerConfig, TrainConfig
from difflab.errors import DifflabError, counted, one_line, shorten
from difflab.limits import MAX_IMAGES, MAX_SAMPLE_BATCH, Bounded, Limits

log = logging.getLogger("difflab")
EXIT_ERROR = 2
GIF_IMAGES = 16  # images in sample's reverse-process.gif
# Numeric options: parsed and range-checked by the limits their config fields declare.
SEED = Bounded.like(TrainConfig, "seed")
GUIDANCE = Bounded.like(SamplerConfig, "guidance")


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes in one line instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DifflabError(f"{message} (see {self.prog} --help)")


# --------------------------------------------------------------------------- sample


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from difflab.api import load_run
    from difflab.classes import bind_request, class_rows, labels_for, per_class
    from difflab.cli_eval import sampler_options
    from difflab.data import SAMPLE_PICTURES, SAMPLES_MANIFEST, foreign_images, run_pictures
    from difflab.io import atomic_write_text, check_output_folder
    from difflab.sampling import strip_indices
    from difflab.viz import save_gif, save_grid, save_images, save_strip

    out = check_output_folder(Path(args.out), "--out")
    others = foreign_images(out) if out.is_dir() and not run_pictures(out) else []
    if others:  # samples beside the data would become part of it (samples.json lists them)
        raise DifflabError(
            f"--out {out} holds images that difflab sample does not write ({others[0].name}"
            f"{', ...' if len(others) > 1 else ''}): sample into a folder of their own"
        )
    run = load_run(
        args.run_dir, args.checkpoint, ema=not args.no_ema, device=args.device, guide=args.guide
    )
    plan = run.plan(args.sampler, args.steps, **sampler_options(args))
    guided = run.guide is not None  # autoguidance: a guidance weight needs no label
    # checked before any work:
    bind_request(args.label, args.guidance, run.class_names, args.num, guided=guided)
    rows = per_class(args.label, run.class_names, args.num)  # --label all: images per class row
    if run.class_names and args.label is None:
        log.info("sampling p(x) without a class; --label NAME (or all) asks for one")
    grid_size = len(run.class_names) * min(rows, 8) if rows else min(args.num, 64)
    record = (
        (len(run.class_names) * min(rows, 2) if rows else GIF_IMAGES)
        if args.gif or args.strip
        else 0
    )
    # An earlier sample's list and what this one rewrites go first: a run cut off leaves no
    # list that claims a mix of its images and the earlier ones (eval warns of a folder without).
    grid_png, strip_png, gif = (out / name for name in SAMPLE_PICTURES)
    for path, rewritten in ((out / SAMPLES_MANIFEST, True), (grid_png, True),
                            (strip_png, args.strip), (gif, args.gif)):  # fmt: skip
        if rewritten:
            path.unlink(missing_ok=True)
    kept, evaluations, frames = [], 0, None
    with tqdm(total=args.num, desc="sampling", unit="img", disable=args.quiet) as bar:
        for start in range(0, args.num, args.batch_size):
            count = min(args.batch_size, args.num - start)
            result = run.generate(
                count, args.seed, label=args.label, guidance=args.guidance, plan=plan,
                batch_size=count, start=start, record=record,
            )  # fmt: skip
            frames = frames if frames is not None else result.frames
            record = 0  # the first batch's first images only
            save_images(result.images, out, start_index=start)
            kept.append(result.images[: max(grid_size - start, 0)])
            evaluations = result.evaluations
            bar.update(count)
    grid = torch.cat(kept)
    if rows:  # one class per row
        grid = class_rows(grid, len(run.class_names))[0]
        frames = (
            None
            if frames is None
            else torch.stack([class_rows(f, len(run.class_names))[0] for f in frames])
        )
    save_grid(grid, grid_png, nrow=min(rows, 8) if rows else None)
    if args.strip:
        save_strip(frames[1:, 0][strip_indices(plan.num_steps)], strip_png)
    if args.gif:
        save_gif(frames, gif, nrow=min(rows, 2) if rows else None)
    guidance = args.guidance if args.guidance is not None else run.config.sampler.guidance
    labels = labels_for(args.label, run.class_names, args.num)
    manifest = {
        "run": str(args.run_dir), "step": run.step, "sampler": plan.name,
        "steps": plan.num_steps, "evaluations": evaluations, "seed": args.seed,
        "label": args.label, "guidance": guidance if labels is not None or guided else None,
        "images": [f"{i:05d}.png" for i in range(args.num)],
        "classes": None if labels is None else [run.class_names[i] for i in labels.tolist()],
    }  # fmt: skip
    atomic_write_text(out / SAMPLES_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    label = f", label {args.label}" if args.label is not None else ""
    weight = f", guidance {guidance:g}" if labels is not None or guided else ""
    print(
        f"wrote {counted(args.num, 'image')} to {out} (sampler {plan.name}, "
        f"{counted(plan.num_steps, 'step')}, {counted(evaluations, 'network evaluation')} per image, "
        f"step {run.step} weights{label}{weight})"
    )
    return 0


# --------------------------------------------------------------------------- presets, export


def cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from difflab.classes import learn_classes
    from difflab.config import load_preset, preset_names
    from difflab.models import count_parameters, forward_gflops
    from difflab.registry import build_network

    rows = []
    for name in preset_names():
        config = load_preset(name)
        if config.data.conditional:  # counted with CIFAR-10's ten class embeddings
            config = learn_classes(config, [f"class {i}" for i in range(10)], "CIFAR-10")
        with torch.device("meta"):  # shapes only: counted without memory or arithmetic
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


def cmd_report(args: argparse.Namespace) -> int:
    from difflab.io import check_output_file
    from difflab.report import write_report

    out = check_output_file(Path(args.out), "--out", (".html", ".htm"), "the report")
    write_report([Path(run) for run in args.run_dirs], out)
    runs = counted(len(args.run_dirs), "run")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {runs})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from difflab.api import load_run
    from difflab.io import check_output_file, check_output_folder

    out = Path(args.out)
    if args.format == "diffusers":
        from difflab.diffusers_export import write_diffusers

        check_output_folder(out, "--out")
        run = load_run(args.run_dir, args.checkpoint, ema=not args.raw, device="cpu")
        write_diffusers(run, out, Path(args.run_dir))
        if run.guide is not None:
            log.warning(
                "a diffusers pipeline samples without difflab's autoguidance: the export holds "
                "the model only, not its guide (sampler.guide_at)"
            )
        how = (
            "UNet2DModel and DDPMScheduler load it in diffusers (class-conditional: its "
            "README.md has the sampling loop with class_labels)"
            if run.class_names
            else f"DDPMPipeline.from_pretrained({str(out)!r}) loads it in diffusers"
        )
        print(f"exported step {run.step} to {out}: {how}")
        return 0
    check_output_file(out, "--out", (".safetensors",), "the export file")  # before loading
    run = load_run(args.run_dir, args.checkpoint, ema=not args.raw, device="cpu")
    run.export(out)
    guide = ", and the run's own guide" if run.guide is not None else ""
    print(f"exported step {run.step} ({run.weights} weights{guide}) to {out}")
    return 0


# --------------------------------------------------------------------------- parser


def _add_global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """--debug and -q, before or after the command (SUPPRESS: a command's parser only sets
    them when given, so it does not undo them when given before)."""
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars or notes: warnings, errors and the result line only",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="difflab", description="Train, sample and measure small image diffusion models."
    )
    _add_global_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from difflab.cli_distill import add_distill_command
    from difflab.cli_eval import (
        CHECKPOINT_HELP,
        DEVICE_HELP,
        GUIDE_HELP,
        add_eval_commands,
        add_sampler_options,
    )
    from difflab.cli_train import add_train_command

    add_train_command(sub)
    add_distill_command(sub)

    sample = sub.add_parser("sample", help="sample images from a run")
    sample.add_argument("run_dir", help="run directory or exported .safetensors")
    sample.add_argument(
        "--num", type=Bounded(int, Limits(low=1, high=MAX_IMAGES)), default=16, help="images (16)"
    )
    sample.add_argument(
        "--out",
        required=True,
        help="folder for 00000.png, ..., grid.png and samples.json (the request)",
    )
    sample.add_argument(
        "--seed", type=SEED, default=0, help="image i of seed s is the same at any --batch-size (0)"
    )
    sample.add_argument("--label", help="a class name or index, or all (conditional runs)")
    sample.add_argument(
        "--guidance",
        type=GUIDANCE,
        help="guidance w (1: plain): towards --label, or away from the guide",
    )
    sample.add_argument(
        "--batch-size",
        type=Bounded(int, Limits(low=1, high=MAX_SAMPLE_BATCH)),
        default=64,
        help="images sampled at once (64)",
    )
    add_sampler_options(sample)
    sample.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    sample.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    sample.add_argument("--guide", help=GUIDE_HELP)
    sample.add_argument("--strip", action="store_true", help="also write strip.png of the progress")
    sample.add_argument("--gif", action="store_true", help="also write reverse-process.gif")
    sample.add_argument("--device", default="auto", help=DEVICE_HELP)
    sample.set_defaults(func=cmd_sample)

    report = sub.add_parser("report", help="one self-contained HTML page of runs")
    report.add_argument("run_dirs", nargs="+", help="run directories (side-by-side columns)")
    report.add_argument("--out", required=True, help="the .html file to write")
    report.set_defaults(func=cmd_report)

    presets = sub.add_parser("presets", help="list presets with parameter counts")
    presets.set_defaults(func=cmd_presets)

    export = sub.add_parser(
        "export", help="write a run's weights and config to one .safetensors, or for diffusers"
    )
    export.add_argument("run_dir", help="run directory or exported .safetensors")
    export.add_argument("--out", required=True, help="FILE.safetensors, or a folder (diffusers)")
    export.add_argument(
        "--format",
        choices=("safetensors", "diffusers"),
        default="safetensors",
        help="diffusers: a DDPMPipeline folder (UNet2DModel + DDPMScheduler + model card); "
        "DDPM presets with the positional embedding (ddpm-paper, ddpm-cosine-paper)",
    )
    export.add_argument(
        "--raw", "--no-ema", action="store_true", help="raw weights instead of the EMA"
    )
    export.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    export.set_defaults(func=cmd_export)

    add_eval_commands(sub)
    for command in sub.choices.values():  # `difflab train -q` as well as `difflab -q train`
        _add_global_options(command, default=argparse.SUPPRESS)
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
    with warnings.catch_warnings(), _terminate_as_interrupt():  # both restored on return
        if not debug:
            warnings.showwarning = _show_warning
        return _main(argv, debug)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C is: what is half-written is removed
    on the way out (training's loop takes both signals itself and checkpoints first)."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    def handle(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: What frees memory, by command: training can accumulate gradients over smaller batches.
_MEMORY_ADVICE = {
    "train": "lower --batch-size or raise train.accumulation",
    "distill": "lower --batch-size or raise train.accumulation",
    **dict.fromkeys(("sample", "eval", "ref"), "lower --batch-size"),
}


def _out_of_memory(error: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (torch raises a RuntimeError there)."""
    import torch

    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _main(argv: list[str], debug: bool) -> int:
    args = None
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
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        print(f"difflab: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as error:  # the last line of defence: still one line, unless --debug
        if debug:
            raise
        if _out_of_memory(error):
            advice = _MEMORY_ADVICE.get(getattr(args, "command", ""), "free some memory")
            print(f"difflab: error: out of memory; {advice}", file=sys.stderr)
        else:
            print(
                f"difflab: error: unexpected {type(error).__name__}: {_one_line(error)} (rerun "
                "with --debug for the traceback and please report it)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
