"""Training logs: JSONL for scripts, TensorBoard for people, a loss-curve PNG for both."""

from __future__ import annotations

import json
import math
from pathlib import Path

from difflab.io import atomic_write_text


class TrainLog:
    """Appends one JSON row per log interval to RUN_DIR/log.jsonl and mirrors it to TensorBoard."""

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        """``start_step`` > 0 resumes: rows written after that checkpoint are dropped."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "log.jsonl"
        self.rows = [row for row in read_metrics(self.path) if row["step"] <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:  # TensorBoard is imported only when the first row is written
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, row["step"])

    def plot(self) -> None:
        from difflab.viz import plot_loss

        rows = [row for row in self.rows if "loss" in row]  # FID rows have no loss
        if len(rows) >= 2:
            steps = [row["step"] for row in rows]
            losses = [row["loss"] for row in rows]
            plot_loss(steps, losses, self.run_dir / "loss.png", smoothing=5)

    def close(self) -> None:
        """Plot the loss and close TensorBoard's writer; safe to call more than once."""
        self.plot()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a log.jsonl that a training could have written: a step, kimg and numbers
    only (a row edited by hand or by another tool is ignored like a garbled line)."""

    def number(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return [
        row
        for row in read_log(path)
        if {"step", "kimg"} <= row.keys() and all(map(number, row.values()))
    ]


def read_log(path: Path) -> list[dict[str, float]]:
    """Rows of a .jsonl log (log.jsonl, invocations.jsonl); a line cut off or garbled by a
    crash is ignored."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows
