"""What ``lavit sweep`` shows while its runs train: a summary line and one line per device slot.

On a terminal the block is redrawn in place about once a second, with the runner's event lines
(a run started, finished, stopped) printed above it; elsewhere (a log file, CI) the same lines are
printed as plain text every ``interval_s`` seconds and when a run starts or ends. The lines come
from each run's own files: its ``metrics.csv`` (epoch, latest ``val/top1``, the run's own
``train/eta_s``, which moves inside a long epoch) and the ``config.yaml`` LightningCLI writes.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from lavit.tools.sweep_engine import DONE_STATES, read_metric_history, run_values
from lavit.units import format_duration


@dataclass
class RunProgress:
    """How far a running run is, from its files."""

    epoch: int | None = None  # epochs started (1-based)
    max_epochs: int | None = None
    top1: float | None = None  # the latest value of the sweep metric
    epochs_done: int = 0  # epochs with a logged value of the sweep metric
    eta_s: float | None = None  # the run's own estimate of its remaining training time

    def fraction_at(self, elapsed: float) -> float | None:
        """Share done after ``elapsed`` s: from ``train/eta_s`` when logged, else validated
        epochs / max_epochs (``None``: unknown)."""
        if self.eta_s is not None and elapsed + self.eta_s > 0:
            return min(1.0, elapsed / (elapsed + self.eta_s))
        return min(1.0, self.epochs_done / self.max_epochs) if self.max_epochs else None


def _max_epochs(run_dir: Path) -> int | None:
    for path in sorted(run_dir.glob("version_*/config.yaml")):
        try:
            value = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("trainer") or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(value.get("max_epochs"), int) and value["max_epochs"] > 0:
            return value["max_epochs"]
    return None


def run_progress(history: list[dict[str, Any]], run_dir: Path, metric: str | None) -> RunProgress:
    """A running run's progress from its metric rows (``read_metric_history``) and run dir."""
    epochs = [row["epoch"] for row in history if "epoch" in row]
    values = [row for row in history if metric and metric in row]
    etas = [row["train/eta_s"] for row in history if "train/eta_s" in row]
    return RunProgress(
        epoch=int(max(epochs)) + 1 if epochs else None,
        max_epochs=_max_epochs(run_dir),
        top1=values[-1][metric] if values else None,
        epochs_done=len({row.get("epoch", i) for i, row in enumerate(values)}),
        eta_s=etas[-1] if etas else None,
    )


def sweep_eta(
    total: int | None,
    started: int,
    finished_durations: list[float],
    running: list[tuple[float, float | None]],
    slots: int,
) -> float | None:
    """Seconds until the sweep is done, or ``None`` when nothing allows a guess yet.

    ``total``: runs the sweep will have (``None``: unknown); ``started``: runs started so far;
    ``running``: ``(elapsed, fraction done or None)`` of each running run.
    """
    projected = [elapsed / fraction for elapsed, fraction in running if fraction]
    typical = finished_durations or projected
    if total is None or not typical:
        return None
    per_run = sum(typical) / len(typical)
    remaining = sum(
        max(0.0, elapsed / fraction - elapsed) if fraction else max(0.0, per_run - elapsed)
        for elapsed, fraction in running
    )
    return (remaining + max(0, total - started) * per_run) / max(1, slots)


def format_values(values: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in values.items())


def count_states(runs: list) -> str:
    """``2 finished, 1 failed, 1 stopped early``: the runs by state (none left out but zeros)."""
    said = {"stopped": "stopped early"}
    counts = {s: sum(r.state == s for r in runs) for s in (*DONE_STATES, "pending", "running")}
    return ", ".join(f"{n} {said.get(s, s)}" for s, n in counts.items() if n)


def total_runs(runner) -> int | None:
    """Runs the sweep will have when this invocation ends (``None``: unknown)."""
    config, total = runner.state.sweep_config, math.inf
    if config.get("method") == "grid":
        specs = (config.get("parameters") or {}).values()
        if any("values" not in s and "value" not in s for s in specs):
            return None  # nested parameters: the engine knows, not this count
        total = math.prod(len(s["values"]) for s in specs if "values" in s)
    if config.get("run_cap") is not None:
        total = min(total, config["run_cap"])
    if runner.count is not None:
        total = min(total, runner.started_before + runner.count)
    return None if math.isinf(total) else int(total)


def status_lines(runner, active: dict[int, Any]) -> list[str]:
    """The sweep's summary line, then one line per device slot of a ``SweepRunner``."""
    now_s, metric, runs = time.monotonic(), runner.state.metric_name, runner.state.runs
    total = total_runs(runner)
    lines, running = [], []
    for slot, device in enumerate(runner.devices):
        if slot not in active:
            lines.append(f"[sweep]   {device}: idle")
            continue
        record, elapsed = active[slot].record, now_s - active[slot].started
        run_dir = runner.sweep_dir / record.run_dir
        progress = run_progress(read_metric_history(run_dir), run_dir, metric)
        fraction = progress.fraction_at(elapsed)
        running.append((elapsed, fraction))
        epoch = f"epoch {progress.epoch or '?'}"
        if progress.epoch:
            epoch += f"/{progress.max_epochs or '?'}"
        if progress.eta_s is not None and fraction is not None:
            epoch += f" ({fraction:.0%})"
        value = "-" if progress.top1 is None else f"{progress.top1:.4f}"
        index = int(record.name.rsplit("-", 1)[-1]) + 1
        lines.append(
            f"[sweep]   {device}: run {index} of {total or '?'} "
            f"({format_values(run_values(record.config))}): {epoch}, {metric} {value}, "
            f"{format_duration(elapsed)}"
        )
    done = [r for r in runs if r.state in DONE_STATES]
    finished = [r.duration_s for r in done if r.state == "finished" and r.duration_s]
    started = sum(r.state != "pending" for r in runs)
    eta = sweep_eta(total, started, finished, running, len(runner.devices))
    apart = count_states([r for r in done if r.state != "finished"])
    summary = (
        f"[sweep] {runner.name}: {len(done)} of {total or '?'} runs done"
        f"{f' ({apart})' if apart else ''}, {len(active)} running, "
        f"{format_duration(now_s - runner.started_at)} elapsed, ETA {format_duration(eta)}"
    )
    return [summary, *lines]


class LiveStatus:
    """Status lines: redrawn in place on a terminal, printed every ``interval_s`` elsewhere."""

    def __init__(
        self, stream: TextIO | None = None, tty: bool | None = None, interval_s: float = 60.0
    ) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.interval_s = 1.0 if self.tty else interval_s
        self.block: list[str] = []  # the lines on screen (a terminal only)
        self.last_shown = -math.inf

    def _print(self, lines: list[str]) -> None:
        # on a terminal: back to the block's first line and erase to the end of the screen
        erase = f"\x1b[{len(self.block)}F\x1b[J" if self.block else ""
        self.stream.write(erase + "".join(f"{line}\n" for line in lines))
        self.stream.flush()

    def show(self, lines: list[str], force: bool = False) -> None:
        """Show ``lines`` now if due (or ``force``)."""
        if force or time.monotonic() - self.last_shown >= self.interval_s:
            self.last_shown = time.monotonic()
            self._print(lines)
            self.block = list(lines) if self.tty else []

    def log(self, message: str) -> None:
        """An event line; on a terminal above the live block, which is drawn again below it."""
        self._print([message, *self.block])
