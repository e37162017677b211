"""Reliability, round five (2026-11-28): what the fifth hostile probe and the last round's
leftovers found, each case as a test."""

from __future__ import annotations

import dataclasses

import pytest

import difflab
from difflab.config import MethodConfig, SamplerConfig
from difflab.plans import build_sampler
from difflab.registry import METHODS


def test_a_plan_runs_only_on_the_run_it_was_built_for(teacher):
    """A plan knows its method and process: one built for a flow model, or for an EDM model with
    another sigma_max, drove this EDM run's network on the wrong grid without a word."""
    run = difflab.load_run(teacher, device="cpu")
    edm = dataclasses.replace(run.config.method.edm, sigma_max=10.0)
    others = [
        build_sampler(METHODS["flow"](MethodConfig(name="flow")), SamplerConfig(steps=2)),
        build_sampler(METHODS["edm"](MethodConfig(name="edm", edm=edm)), SamplerConfig(steps=2)),
    ]
    for plan in others:
        with pytest.raises(difflab.DifflabError, match="this plan was built for another run"):
            run.sample(2, plan=plan)
    again = difflab.load_run(teacher, device="cpu").plan(steps=2)  # the same run, loaded again
    assert run.sample(2, plan=again).shape == (2, *run.image_shape)
