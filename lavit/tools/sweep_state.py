"""The state of an offline sweep: ``<sweep dir>/sweep_state.json`` and the runs' metric logs.

Written atomically after every change, so that the same ``lavit sweep`` command resumes a sweep
after a crash, and read by ``lavit report`` for the tables.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lavit.tools.sweep_engine import import_sweeps

__all__ = [
    "DONE_STATES",
    "RUNS_DIR",
    "RUN_LOG",
    "STATE_FILE",
    "STOPPED",
    "RunRecord",
    "SweepState",
    "load_state",
    "now",
    "read_metric_history",
    "save_state",
    "summarise",
]

STATE_FILE = "sweep_state.json"
RUNS_DIR = "runs"
RUN_LOG = "run.log"
# What the state file calls a run stopped by early termination; the engine's word for it.
STOPPED = "stopped"
DONE_STATES = ("finished", "failed", STOPPED)


# ----------------------------------------------------------------------------------------- state


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """One run of the sweep, as stored in the state file."""

    name: str
    config: dict[str, dict[str, Any]]  # W&B run config: {param: {"value": v}}
    run_dir: str  # relative to the sweep dir
    state: str = "pending"  # pending | running | finished | failed | stopped (early_terminate)
    device: str | None = None
    command: list[str] = field(default_factory=list)
    exitcode: int | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    summary_metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_sweep_run(self):
        """This run as the engine's ``SweepRun`` (state and metrics included, for bayes)."""
        sweeps = import_sweeps()
        return sweeps.SweepRun(
            name=self.name,
            config=self.config,
            state="killed" if self.state == STOPPED else self.state,
            summary_metrics=self.summary_metrics,
            history=self.history,
            exitcode=self.exitcode,
        )


@dataclass
class SweepState:
    """Everything a resumed sweep needs: the sweep config, the overrides and the runs so far."""

    sweep_file: str
    sweep_config: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)  # replace the command's --config files
    runs: list[RunRecord] = field(default_factory=list)
    created_at: str = field(default_factory=now)

    @property
    def metric_name(self) -> str | None:
        return (self.sweep_config.get("metric") or {}).get("name")


def load_state(sweep_dir: str | Path) -> SweepState:
    """Read ``<sweep_dir>/sweep_state.json``."""
    data = json.loads((Path(sweep_dir) / STATE_FILE).read_text(encoding="utf-8"))
    runs = [RunRecord(**run) for run in data.pop("runs", [])]
    return SweepState(**data, runs=runs)


def save_state(state: SweepState, sweep_dir: Path) -> None:
    """Write the state file atomically: a temporary file, flushed, then renamed over the old one."""
    path = sweep_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as stream:
        json.dump(asdict(state), stream, indent=2, default=str)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- metrics


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_metric_history(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of the run's CSV log(s) (Lightning's ``metrics.csv``), numbers only, in log order."""
    history: list[dict[str, Any]] = []
    for path in sorted(run_dir.rglob("metrics.csv")):
        with open(path, newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                values = {k: _number(v) for k, v in row.items() if k and v not in (None, "")}
                values = {k: v for k, v in values.items() if v is not None}
                if values:
                    history.append(values)
    return history


def summarise(history: list[dict[str, Any]]) -> dict[str, Any]:
    """W&B-style summary: the last logged value of every metric."""
    summary: dict[str, Any] = {}
    for row in history:
        summary.update(row)
    return summary
