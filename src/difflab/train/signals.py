"""Stopping on request: SIGINT or SIGTERM becomes a flag the training loop checks."""

from __future__ import annotations

import contextlib
import signal


class StopRequest:
    """While entered, SIGINT and SIGTERM set ``signum`` instead of killing the process."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
