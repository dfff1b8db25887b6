"""What ``lavit sweep`` shows while its runs train: a summary line and one line per device slot.

On a terminal the block is redrawn in place about once a second, and the runner's event lines
(a run started, finished, stopped) are printed above it. Anywhere else (a log file, a pipe, CI)
the same lines are printed as plain text every ``interval_s`` seconds (and when a run starts or
ends), so a log shows how the sweep went without carriage returns or escape codes.

The lines come from each run's own files: its CSV log (``metrics.csv``: the epoch reached, the
latest ``val/top1`` and the run's own ``train/eta_s``) and the ``config.yaml`` LightningCLI writes
(``trainer.max_epochs``). The ETA of a run inside a long epoch (a one-epoch run has no validated
epoch until it ends) comes from its ``train/eta_s``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

__all__ = ["LiveStatus", "RunProgress", "run_progress", "sweep_eta"]

ERASE_LINE = "\x1b[2K"
TTY_REFRESH_S = 1.0


@dataclass
class RunProgress:
    """How far a running run is, from its files."""

    epoch: int | None = None  # epochs started (1-based), from the CSV log
    max_epochs: int | None = None  # from the run's config.yaml
    top1: float | None = None  # the latest value of the sweep metric
    epochs_done: int = 0  # epochs with a logged value of the sweep metric
    eta_s: float | None = None  # the run's own estimate of its remaining training time

    @property
    def fraction(self) -> float | None:
        """Share of the run done (validated epochs / max_epochs), when both are known."""
        if not self.max_epochs or self.max_epochs <= 0:
            return None
        return min(1.0, self.epochs_done / self.max_epochs)

    def fraction_at(self, elapsed: float) -> float | None:
        """Share done after ``elapsed`` seconds: from the run's ``train/eta_s`` when it logs one
        (step-level, so it moves within an epoch), else from its validated epochs."""
        if self.eta_s is None or elapsed + self.eta_s <= 0:
            return self.fraction
        return min(1.0, elapsed / (elapsed + self.eta_s))


def _max_epochs(run_dir: Path) -> int | None:
    for path in sorted(run_dir.glob("version_*/config.yaml")):
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        value = (config.get("trainer") or {}).get("max_epochs")
        if isinstance(value, int) and value > 0:
            return value
    return None


def run_progress(history: list[dict[str, Any]], run_dir: Path, metric: str | None) -> RunProgress:
    """A running run's progress from its metric rows (``read_metric_history``) and run dir."""
    progress = RunProgress(max_epochs=_max_epochs(run_dir))
    epochs = [row["epoch"] for row in history if "epoch" in row]
    if epochs:
        progress.epoch = int(max(epochs)) + 1
    values = [row for row in history if metric and metric in row]
    if values:
        progress.top1 = values[-1][metric]
        progress.epochs_done = len({row.get("epoch", i) for i, row in enumerate(values)})
    etas = [row["train/eta_s"] for row in history if "train/eta_s" in row]
    if etas:
        progress.eta_s = etas[-1]
    return progress


def sweep_eta(
    total: int | None,
    started: int,
    finished_durations: list[float],
    running: list[tuple[float, float | None]],
    slots: int,
) -> float | None:
    """Seconds until the sweep is done, or ``None`` when nothing allows a guess yet.

    Args:
        total: runs the sweep will have (``None``: unknown, e.g. random without a cap).
        started: runs started so far (finished, failed, stopped and running).
        finished_durations: wall time of each finished run.
        running: ``(elapsed, fraction done or None)`` of each running run.
        slots: device slots running in parallel.
    """
    if total is None:
        return None
    projected = [elapsed / fraction for elapsed, fraction in running if fraction]
    typical = finished_durations or projected
    if not typical:
        return None
    per_run = sum(typical) / len(typical)
    remaining = sum(
        max(0.0, elapsed / fraction - elapsed) if fraction else max(0.0, per_run - elapsed)
        for elapsed, fraction in running
    )
    remaining += max(0, total - started) * per_run
    return remaining / max(1, slots)


class LiveStatus:
    """Status lines: redrawn in place on a terminal, printed every ``interval_s`` elsewhere."""

    def __init__(
        self, stream: TextIO | None = None, tty: bool | None = None, interval_s: float = 60.0
    ) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.interval_s = interval_s
        self._drawn: list[str] = []
        self._last_shown = -math.inf

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _erase(self) -> None:
        if self._drawn:  # to the block's first line, clearing every line of it
            self._write(f"\x1b[{len(self._drawn)}F" + f"{ERASE_LINE}\n" * len(self._drawn))
            self._write(f"\x1b[{len(self._drawn)}F")

    def show(self, lines: list[str], force: bool = False) -> None:
        """Show ``lines`` now if due (a terminal: at most once a second; else every interval)."""
        now = time.monotonic()
        due = TTY_REFRESH_S if self.tty else self.interval_s
        if not force and now - self._last_shown < due:
            return
        self._last_shown = now
        if self.tty:
            self._erase()
            self._write("".join(f"{ERASE_LINE}{line}\n" for line in lines))
            self._drawn = list(lines)
        else:
            self._write("".join(f"{line}\n" for line in lines))

    def log(self, message: str) -> None:
        """An event line; on a terminal above the live block, which is drawn again below it."""
        if self.tty and self._drawn:
            block = self._drawn
            self._erase()
            self._drawn = []
            self._write(f"{ERASE_LINE}{message}\n")
            self._write("".join(f"{ERASE_LINE}{line}\n" for line in block))
            self._drawn = block
        else:
            self._write(f"{message}\n")
