"""``difflab ref`` and ``difflab eval``: reference statistics of a data set, FID and KID."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from difflab.config import DataConfig, SamplerConfig, TrainConfig
from difflab.errors import DifflabError
from difflab.limits import MAX_IMAGES, Bounded, Limits, limits_of

log = logging.getLogger("difflab")

MAX_EVAL_BATCH = 500  # images through Inception at 299 x 299 at once: about 8 GB of activations

KID_SUBSET = 1000
DEFAULT_SIZE = 32  # the size images are scored at when neither --image-size nor --ref says
GUIDE_HELP = (
    "autoguidance: guide away from this weaker model of the same method (a run, one of its "
    "checkpoint folders, or an export), with --guidance W (default: the run's own guide; "
    "a guide named here guides at the run's weight, or at 2 where that is 1)"
)
CHECKPOINT_HELP = (
    "one of the run's checkpoints: its folder, its name step-N or its step N (default: newest)"
)
DEVICE_HELP = "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps"


#: Sampler settings that `sample` and `eval` take on the command line, beside --sampler/--steps.
SAMPLER_OPTIONS = ("eta", "grid", "rho", "sigma_max")


#: eval's options that only sampling a run uses.
RUN_ONLY = ("sampler", "steps", *SAMPLER_OPTIONS, "checkpoint", "label", "guidance", "guide")


def add_sampler_options(parser: argparse.ArgumentParser) -> None:
    """--sampler, --steps and the grid's options, for a command that samples a run."""
    parser.add_argument(
        "--sampler",
        help="tutorial, ancestral, ddim, euler, heun, edm, edm-stochastic, dpm++2m, ipndm, "
        "consistency (default: the run's)",
    )
    parser.add_argument(
        "--steps", type=Bounded.like(SamplerConfig, "steps", low=1), help="sampler steps"
    )
    parser.add_argument(
        "--eta", type=Bounded.like(SamplerConfig, "eta"), help="DDIM eta (0 deterministic)"
    )
    parser.add_argument(
        "--grid",
        choices=limits_of(SamplerConfig, "grid").choices,
        help="time grid: default, the sampler's; process, the process's own; edm, EDM's rho "
        "spacing; logsnr, even in log SNR; few-step, the top levels of the edm grid, then 0",
    )
    parser.add_argument(
        "--rho",
        type=Bounded.like(SamplerConfig, "rho"),
        help="rho of EDM's spacing in the edm and few-step grids (7; larger: levels nearer clean)",
    )
    parser.add_argument(
        "--sigma-max",
        type=Bounded.like(SamplerConfig, "sigma_max"),
        help="top of the edm, logsnr and few-step grids as sigma (default: the method's, e.g. 80)",
    )


def sampler_options(args: argparse.Namespace) -> dict:
    """The grid's options given on the command line, for ``Run.plan``."""
    return {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k) is not None}


def _extractor(args: argparse.Namespace):
    from difflab.metrics import InceptionFeatures

    return InceptionFeatures(
        args.inception, device=args.device if args.device != "auto" else _auto()
    )


def _auto() -> str:
    from difflab.devices import resolve_device

    return str(resolve_device("auto"))


def reference_stats(
    source: str, class_name: str | None, image_size: int, extractor, batch_size: int
):
    """Inception statistics (and features, for KID) of a data set."""
    from difflab.data import load_images
    from difflab.metrics import extract_features, feature_stats

    data = load_images(source, class_name, image_size)
    features = extract_features(data.images, extractor, batch_size, desc="reference features")
    meta = {"source": data.source, "extractor_sha256": extractor.sha256, "image_size": image_size}
    return feature_stats(features, keep_features=True, meta=meta)


def cmd_ref(args: argparse.Namespace) -> int:
    from difflab.io import check_output_file
    from difflab.metrics import save_stats

    out = Path(args.out)
    check_output_file(out, "--out", (".npz",), "reference statistics")
    stats = reference_stats(
        args.data, args.class_name, args.image_size, _extractor(args), args.batch_size
    )
    save_stats(stats, out)
    print(f"wrote reference statistics of {stats.num_images} images to {out}")
    return 0


def _stored_reference(args: argparse.Namespace):
    """--ref's statistics if it is a .npz (None for a data set), and the size images are
    scored at: --image-size, else the size the reference was made at (32 if not recorded)."""
    from difflab.metrics import load_stats

    if not args.ref.lower().endswith(".npz"):
        if Path(args.ref).is_file():
            raise DifflabError(
                f"--ref {args.ref} is neither a .npz of reference statistics (difflab ref) nor a "
                "folder of images; give one of those, or cifar10"
            )
        return None, args.image_size or DEFAULT_SIZE
    stats = load_stats(args.ref)
    made = stats.image_size or DEFAULT_SIZE  # older files: not recorded
    if args.image_size not in (None, made):
        raise DifflabError(
            f"--ref {args.ref} holds images loaded at {made} px, these would be scored at "
            f"{args.image_size}: drop --image-size (or give {made}), or make a reference at "
            f"{args.image_size}"
        )
    return stats, made


def _is_model(source: Path) -> bool:
    """A run directory or an export: eval samples it."""
    return (source / "config.json").is_file() or source.suffix == ".safetensors"


def generated_batches(args: argparse.Namespace) -> tuple[Iterator[torch.Tensor], int, dict]:
    """uint8 batches of the images to score: a folder's files, or samples of a run."""
    from difflab.viz import to_uint8

    source = Path(args.images)
    if _is_model(source):
        from difflab.api import load_run
        from difflab.classes import bind_request, per_class
        from difflab.data import fit_size

        run = load_run(source, args.checkpoint, device=args.device, guide=args.guide)
        num = args.num or 1000
        options = sampler_options(args)
        plan = run.plan(args.sampler, args.steps, **options)
        # A conditional run: every class equally (image i asks for class i mod C) by default.
        label = args.label or ("all" if run.class_names else None)
        guidance = args.guidance if args.guidance is not None else run.config.sampler.guidance
        per_class(label, run.class_names, num)  # a wrong label fails before any work
        bind_request(label, args.guidance, run.class_names, num, guided=run.guide is not None)
        info = {"run": str(source), "step": run.step, "sampler": plan.name, "steps": plan.num_steps}
        info.update(options)
        if run.config.data.image_size != args.image_size:  # scored at the reference's size
            info["scored_px"] = args.image_size
        if label is not None:
            info.update(label=label, guidance=guidance)
        if run.guide is not None:
            info.update(guide=args.guide or "the run's own (sampler.guide_at)", guidance=guidance)

        def sample() -> Iterator[torch.Tensor]:
            for start in range(0, num, args.batch_size):
                count = min(args.batch_size, num - start)
                generated = run.generate(
                    count, args.seed, label=label, guidance=guidance, plan=plan, start=start
                )
                info["evaluations"] = generated.evaluations  # network evaluations per image
                yield fit_size(to_uint8(generated.images), args.image_size)  # as a folder's

        return sample(), num, info
    from difflab.data import SAMPLE_NAME, SAMPLES_MANIFEST, image_files, load_images

    numbered = source.is_dir() and any(SAMPLE_NAME.fullmatch(p.name) for p in image_files(source))
    if not (source / SAMPLES_MANIFEST).is_file() and numbered:
        log.warning(
            "%s holds numbered samples but no %s (a difflab sample cut off?): scoring every "
            "image in it",
            source,
            SAMPLES_MANIFEST,
        )
    images = load_images(str(source), None, args.image_size).images
    if args.num:
        if args.num > len(images):
            raise DifflabError(f"--num {args.num}: {source} holds only {len(images)} images")
        images = images[: args.num]
    batches = (images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size))
    return batches, len(images), {"folder": str(source)}


def cmd_eval(args: argparse.Namespace) -> int:
    from difflab.io import atomic_write_text, check_output_file, check_output_folder
    from difflab.metrics import extract_features, fid_kid

    if args.json:
        check_output_file(Path(args.json), "--json", (".json",), "the result")
    else:  # the result goes beside the images: refused before the work, not after it
        try:
            check_output_folder(_result_folder(Path(args.images)), "eval")
        except DifflabError as error:
            raise DifflabError(f"{error}; give --json FILE to write the result elsewhere") from None
    given = [f"--{k.replace('_', '-')}" for k in RUN_ONLY if getattr(args, k) is not None]
    if given and not _is_model(Path(args.images)):
        raise DifflabError(f"{', '.join(given)}: for a run; {args.images} is a folder of images")
    ref, args.image_size = _stored_reference(args)
    extractor = _extractor(args)
    if ref is None:
        ref = reference_stats(
            args.ref, args.class_name, args.image_size, extractor, args.batch_size
        )
    batches, num, info = generated_batches(args)
    if num < 2:
        raise DifflabError(f"KID needs at least 2 images, got {num}")
    if num < KID_SUBSET:  # FID's bias grows as n falls: scores of different n do not compare
        log.warning(
            "FID of %d images is biased upward, the more the fewer: compare only scores of the "
            "same number of images (%s or more is usual)",
            num,
            f"{KID_SUBSET:,}",
        )
    features = extract_features(
        batches, extractor, args.batch_size, desc="sample features", total=num
    )
    result = fid_kid(features, ref, subset_size=KID_SUBSET, seed=args.seed)
    result.update(info, image_size=args.image_size)
    print(f"FID {result['fid']:.3f}  (n={result['num_gen']} vs {result['num_ref']})")
    print(f"KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}")
    out = Path(args.json) if args.json else _default_json(Path(args.images), info, num)
    atomic_write_text(out, json.dumps(_plain(result), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _default_json(source: Path, info: dict, num: int) -> Path:
    if "run" in info and source.is_dir():
        label = f"-{info['label']}" if "label" in info else ""
        weight = f"-w{info['guidance']:g}" if "guidance" in info else ""
        chosen = "".join(  # e.g. -gridedm-rho3, and -px32 for a 16 px run scored at 32
            f"-{k.replace('_', '')}{v if isinstance(v, str) else format(v, 'g')}"
            for k, v in info.items() if k in SAMPLER_OPTIONS
        ) + (f"-px{info['scored_px']}" if "scored_px" in info else "")  # fmt: skip
        name = (
            f"eval-step{info['step']}-{info['sampler']}{info['steps']}{chosen}{label}{weight}"
            f"-n{num}.json"
        )
        return source / name
    return _result_folder(source) / "eval.json"


def _result_folder(source: Path) -> Path:
    """Where eval's result goes by default: in a folder of images or a run, beside an export."""
    return source if source.is_dir() else source.parent


def _plain(values: dict) -> dict:
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    ref = sub.add_parser("ref", help="reference statistics (Inception features) of a data set")
    ref.add_argument("data", help="cifar10 or an image folder")
    ref.add_argument("--class", dest="class_name", help="class name or index")
    ref.add_argument("--out", required=True, help="REF.npz")
    _metric_options(ref, DEFAULT_SIZE, "size images are loaded at, and later scored at")
    ref.set_defaults(func=cmd_ref)

    evaluate = sub.add_parser("eval", help="FID and KID of a folder of images or of a run")
    evaluate.add_argument("images", help="a folder of PNG/JPEG files, a run directory or an export")
    evaluate.add_argument("--ref", required=True, help="REF.npz from difflab ref, or a data set")
    evaluate.add_argument("--class", dest="class_name", help="class of --ref when it is a data set")
    evaluate.add_argument(
        "--num", type=Bounded(int, Limits(low=2, high=MAX_IMAGES)), help="images (run: 1000)"
    )
    add_sampler_options(evaluate)
    evaluate.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    evaluate.add_argument(
        "--seed",
        type=Bounded.like(TrainConfig, "seed"),
        default=0,
        help="a run's sampling seed, and KID's subsets' (0)",
    )
    evaluate.add_argument(
        "--label", help="class(es) to sample from a conditional run (default all)"
    )
    evaluate.add_argument(
        "--guidance",
        type=Bounded.like(SamplerConfig, "guidance"),
        help="a run's guidance w (1: plain): towards --label, or away from the guide",
    )
    evaluate.add_argument("--guide", help=GUIDE_HELP)
    evaluate.add_argument("--json", help="where to write the result (default beside the images)")
    _metric_options(
        evaluate,
        None,
        "size images are scored at, a folder's and a run's samples alike (default: the size "
        f"--ref was made at, else {DEFAULT_SIZE})",
    )
    evaluate.set_defaults(func=cmd_eval)


def _metric_options(parser: argparse.ArgumentParser, size: int | None, size_help: str) -> None:
    parser.add_argument(
        "--image-size", type=Bounded.like(DataConfig, "image_size"), default=size, help=size_help
    )
    parser.add_argument(
        "--inception", help="TorchScript Inception weights (default: the metrics extra's)"
    )
    parser.add_argument(
        "--batch-size",
        type=Bounded(int, Limits(low=1, high=MAX_EVAL_BATCH)),
        default=50,
        help="images through Inception (and a run's sampler) at once (50)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
