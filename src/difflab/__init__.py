"""difflab: train small image diffusion models from scratch, watch every step, measure the images."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difflab.api import Run, load_run
    from difflab.config import Config, load_preset
    from difflab.errors import DifflabError
    from difflab.viz import save_gif, save_grid, save_strip

__all__ = [
    "Config", "DifflabError", "Run", "load_preset", "load_run", "save_gif", "save_grid", "save_strip"
]  # fmt: skip
__version__ = "0.1.0"
# Where each public name lives: imported on first use (PEP 562), so that the command line
# starts inside its own error handling (a Ctrl-C while torch loads is "interrupted", not a
# traceback) and `import difflab` stays cheap.
_HOMES = {
    "Run": "difflab.api",
    "load_run": "difflab.api",
    "Config": "difflab.config",
    "load_preset": "difflab.config",
    "DifflabError": "difflab.errors",
    "save_grid": "difflab.viz",
    "save_strip": "difflab.viz",
    "save_gif": "difflab.viz",
}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'difflab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
