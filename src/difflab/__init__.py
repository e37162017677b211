"""difflab: train small image diffusion models from scratch, watch every step, measure the images."""

from difflab.api import Run, load_run
from difflab.config import Config, load_preset
from difflab.errors import DifflabError
from difflab.viz import save_grid

__all__ = ["Config", "DifflabError", "Run", "load_preset", "load_run", "save_grid"]
__version__ = "0.1.0"
