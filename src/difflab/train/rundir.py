"""The run directory: one owner at a time, never silently overwritten."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from difflab.errors import DifflabError
from difflab.io import check_output_folder, make_folder


class RunLock:
    """An exclusive ``flock`` on RUN_DIR/.lock; the kernel releases it when the process dies."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.handle: IO[str] | None = None

    def __enter__(self) -> RunLock:
        make_folder(self.path.parent, "run directory")
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise DifflabError(
                f"{self.path.parent} is in use by {owner}; wait for it to finish or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may use an empty or missing folder, never one that holds another run."""
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        raise DifflabError(
            f"{run_dir} already holds a run; continue it with difflab train --resume {run_dir} or choose "
            "another --out"
        )
    check_output_folder(run_dir, "--out")


def check_existing_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise DifflabError(f"{run_dir} is a file, not a run directory")
    if not run_dir.is_dir():
        raise DifflabError(f"run directory {run_dir} does not exist")
    if not (run_dir / "config.json").is_file():
        raise DifflabError(f"{run_dir} has no config.json: it is not a difflab run directory")
    check_output_folder(run_dir, "--resume")  # a run goes on in its own folder
