"""Multi-process training with PyTorch's own engine: DDP launched by ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything runs in one process.
NCCL is used on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from difflab.errors import DifflabError, brief


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_LAUNCH = "launch with torchrun, which sets them, or unset them for one process"


def check_environment() -> bool:
    """Whether torchrun's variables describe more than one process, with a one-line error
    (before any work) for values that cannot: not whole numbers, or no rendezvous address."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        value = os.environ.get(name, "0")
        if not value.strip().isdecimal():
            raise DifflabError(f"{name}={value!r} is not a whole number; {_LAUNCH}")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise DifflabError(f"WORLD_SIZE > 1 but {' and '.join(missing)} not set; {_LAUNCH}")
    return True


def init_world(device_kind: str) -> World:
    """Join the process group that torchrun describes in the environment (if any)."""
    if not check_environment():
        return World()
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        except (RuntimeError, ValueError) as error:  # torch's rendezvous errors
            raise DifflabError(f"could not join torchrun's processes ({brief(error)})") from None
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(world: World, flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on at least one (a stop request, a clock)."""
    if not world.distributed:
        return flags
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [value > 0 for value in values.tolist()]


def broadcast_object(world: World, obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(count: int, world: World) -> slice:
    """This rank's contiguous share of ``count`` items (the first ranks take the remainder)."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))
