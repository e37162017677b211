"""The levers of the paper-size U-Net's speed (issue 13), each one option on top of the row it
names first: config values (``train.*``), and options that are not config, put in force by
``applied`` for one measurement."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from difflab.models.unet import SelfAttention

# Compiled rows name their layout: inductor's own (every compiled row of runs 1-5, and the
# levers' base) or channels-last throughout (compile_layout's "auto" on CUDA since run 6).
COMPILED = ["train.compile=true", "train.compile_layout='inductor'"]
GRAPH_CL = ["train.compile=true", "train.compile_layout='channels_last'"]
INDUCTOR = "inductor."  # a lever's option of torch._inductor.config, e.g. "inductor.x=True"
SDPA = "sdpa="  # a lever's only attention kernel (torch.nn.attention.SDPBackend), e.g. "sdpa=math"
HEADS_COPIED = "attention=heads-copied"  # the control of the pixels-first split: copied_heads
LEVERS: list[tuple[str, list[str]]] = [
    ("batch 512, compiled", [*COMPILED, "train.batch_size=512"]),
    ("batch 512, compiled, channels-last graph", [*GRAPH_CL, "train.batch_size=512"]),
    ("batch 512, eager", ["train.batch_size=512"]),
    (
        "batch 512, compiled, channels_last",
        [*COMPILED, "train.batch_size=512", "train.channels_last=true"],
    ),
    (
        "batch 512, compiled, foreach Adam",
        [*COMPILED, "train.batch_size=512", "train.fused_optimizer=false"],
    ),
    ("batch 1024, compiled", [*COMPILED, "train.batch_size=1024"]),
    ("batch 1024, compiled, channels-last graph", [*GRAPH_CL, "train.batch_size=1024"]),
    (
        "batch 512, reduce-overhead (CUDA graphs)",
        [*COMPILED, "train.batch_size=512", "train.compile_mode='reduce-overhead'"],
    ),
    (
        "batch 512, compiled, channels-last graph, aggressive fusion",
        [*GRAPH_CL, "train.batch_size=512", "inductor.aggressive_fusion=True"],
    ),
    (
        "batch 512, compiled, channels-last graph, coordinate-descent tuning",
        [*GRAPH_CL, "train.batch_size=512", "inductor.coordinate_descent_tuning=True"],
    ),
    (  # the math path every U-Net attention took before its heads were made contiguous
        "batch 512, compiled, channels-last graph, math attention",
        [*GRAPH_CL, "train.batch_size=512", "sdpa=math"],
    ),
    (
        "batch 512, compiled, channels-last graph, heads copied",
        [*GRAPH_CL, "train.batch_size=512", HEADS_COPIED],
    ),
    (
        "batch 1024, compiled, channels-last graph, heads copied",
        [*GRAPH_CL, "train.batch_size=1024", HEADS_COPIED],
    ),
    (
        "batch 512, max-autotune-no-cudagraphs",
        [*COMPILED, "train.batch_size=512", "train.compile_mode='max-autotune-no-cudagraphs'"],
    ),
]


def copied_heads(self: SelfAttention, x: torch.Tensor, emb: object = None) -> torch.Tensor:
    """``SelfAttention.forward`` up to run 7: the heads split channels-first and copied apart,
    the output made channels-first, where a channels-last graph copies each layout back (the
    lever's control; the pixels-first split replaced it)."""
    n, c, h, w = x.shape
    qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
    q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


@contextlib.contextmanager
def applied(overrides: list[str]) -> Iterator[tuple[list[str], dict[str, Any]]]:
    """The options of ``overrides`` that are not config in force: ``inductor.OPTION=VALUE`` an
    option of inductor's configuration, ``sdpa=BACKEND`` the only attention kernel allowed,
    HEADS_COPIED ``copied_heads`` in place of the U-Net's attention. Yields the config
    overrides left and what a result records of the rest."""
    inductor = {
        key.removeprefix(INDUCTOR): ast.literal_eval(value)
        for key, value in (o.split("=", 1) for o in overrides if o.startswith(INDUCTOR))
    }
    sdpa = [o.removeprefix(SDPA) for o in overrides if o.startswith(SDPA)]
    kernels = [getattr(SDPBackend, name.upper()) for name in sdpa]
    copied = HEADS_COPIED in overrides
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(inductor))
        if kernels:
            stack.enter_context(sdpa_kernel(kernels))
        if copied:
            stack.enter_context(mock.patch.object(SelfAttention, "forward", copied_heads))
        config = [o for o in overrides if not o.startswith((INDUCTOR, SDPA, HEADS_COPIED))]
        yield (
            config,
            {
                **({"inductor": inductor} if inductor else {}),
                **({"sdpa": sdpa} if sdpa else {}),
                **({"attention": "heads copied"} if copied else {}),
            },
        )
