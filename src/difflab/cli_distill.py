"""``difflab distill``: a one- or few-step consistency model from a trained diffusion run,
trained as any run is (``cli_train.run_training``) with the run as its teacher."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from difflab.cli_train import (
    RUN_FLAGS,
    add_run_options,
    flag_overrides,
    run_training,
    setting_key,
    weight_shapes,
)
from difflab.config import ConsistencyMethod
from difflab.errors import DifflabError
from difflab.limits import Bounded

log = logging.getLogger("difflab")

#: Who teaches a student: set by distill from its RUN_DIR, --guide and --guidance only.
TEACHER_SETTINGS = {
    "method.consistency.teacher",
    "method.consistency.teacher_guide",
    "method.consistency.teacher_guidance",
    "method.consistency.teacher_digest",
}


#: What distill changes in the teacher's settings (``--set`` overrides either): the levels of
#: the teacher's ODE steps, and the learning rate for a student that starts from trained weights.
DISTILL_LEVELS, FINE_TUNE_LR = 18, 1e-4


def cmd_distill(args: argparse.Namespace) -> int:
    """A consistency model from a diffusion run: its data, network and training settings, the
    run as the teacher (or, with --no-teacher, consistency training started from its weights)."""
    from difflab.config import SamplerConfig, apply_overrides
    from difflab.registry import CONSISTENCY_BASES, build_network, teacher_models
    from difflab.train.checkpoint import stored_config, weights_digest
    from difflab.train.guides import carries_guide, check_weaker, load_guide, own_guide_folder
    from difflab.train.rundir import checked_config

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
    named = sorted({setting_key(item) for item in args.set} & TEACHER_SETTINGS)
    if named:  # the teacher is RUN_DIR, its guide --guide: both checked above
        raise DifflabError(
            f"--set {named[0]}: distill's RUN_DIR names the teacher, --guide and --guidance its "
            "guide; drop the --set"
        )
    overrides = flag_overrides(args, *RUN_FLAGS, "data.source")
    config = checked_config(apply_overrides(config, overrides + args.set))
    init = None if args.from_scratch else teacher
    if init is not None and weight_shapes(config.network) != weight_shapes(base.network):
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
    return run_training(config, Path(args.out), args, init=init, class_is_default=True)


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
    add_run_options(distill)
    distill.set_defaults(func=cmd_distill)
