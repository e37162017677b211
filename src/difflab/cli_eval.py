"""``difflab ref`` and ``difflab eval``: reference statistics and FID / KID (filled in below)."""

from __future__ import annotations

import argparse


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    return None
