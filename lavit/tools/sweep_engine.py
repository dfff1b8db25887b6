"""W&B's sweep engine, its command expansion and the sweep's state file, as ``lavit sweep`` uses them.

The ``sweeps`` package (the engine behind W&B's sweep server: schema, grid/random/bayes proposals,
hyperband) and the agent's own macro expansion of a sweep file's ``command``, so that a run of
``lavit sweep`` gets exactly the arguments ``wandb agent`` would give it. The state
(``<sweep dir>/sweep_state.json``, written atomically after every change) lets the same command
resume a sweep, and ``lavit report`` read it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

# What `wandb agent` puts in the command when the sweep file has none.
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
STATE_FILE, RUNS_DIR, RUN_LOG = "sweep_state.json", "runs", "run.log"
STOPPED = "stopped"  # a run stopped by the sweep's early_terminate
DONE_STATES = ("finished", "failed", STOPPED)


class SweepEngineError(RuntimeError):
    """What ``lavit sweep`` needs from W&B's packages is not installed (the message says what)."""


def import_sweeps():
    """The ``sweeps`` package, without the pydantic-v2 warning it triggers on import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError as err:
        problem = str(err)
    else:
        if hasattr(sweeps, "next_run"):
            return sweeps
        # Not installed, but run from the repository root: its sweeps/ folder of sweep files
        # imports as an empty namespace package.
        problem = f"`import sweeps` found only the folder {list(getattr(sweeps, '__path__', []))}"
    raise SweepEngineError(
        "lavit sweep needs W&B's sweep engine, the `sweeps` package of the optional extra "
        "`lavit[sweep]`: pip install 'lavit[sweep]' (in a checkout: pip install -e '.[sweep]') "
        f"({problem})"
    )


def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """Read a sweep file and validate it against W&B's sweep-config schema (raises if invalid)."""
    sweeps = import_sweeps()
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: a sweep file must be a YAML mapping, got {type(config).__name__}"
        )
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        raise ValueError(f"{path} is not a valid W&B sweep config:\n  " + "\n  ".join(violations))
    return config


def agent_command(
    template: list[str] | None,
    run_config: dict[str, dict[str, Any]],
    program: str | None = None,
    interpreter: str = "python",
) -> list[str]:
    """The command ``wandb agent`` runs for one proposed run (``run_config``: ``{p: {"value": v}}``).

    W&B's own helpers render the macros, so ``${args}`` is exactly the agent's (``--key=value``
    with ``str()`` of the value: ``[1, 2, 1, 1]``, ``True``). A token that is exactly ``${name}``
    becomes that macro's list (dropped when empty); anything else is kept verbatim.
    """
    try:  # a private W&B module: guarded, with what to do
        from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
    except ImportError as err:
        import wandb

        raise SweepEngineError(
            f"wandb {getattr(wandb, '__version__', '?')} lacks wandb.sdk.launch.sweeps.utils, the "
            "private W&B module lavit sweep uses to expand a sweep's command exactly as `wandb "
            f"agent` does; install the wandb version lavit is tested with: pip install 'wandb==0.31.0' ({err})"
        ) from err
    macros: dict[str, Any] = create_sweep_command_args({"args": run_config})
    macros |= {"interpreter": [interpreter], "program": [program] if program else []}
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    command: list[str] = []
    for token in map(str, create_sweep_command(list(template or DEFAULT_COMMAND))):
        is_macro = token.startswith("${") and token.endswith("}")
        command += (macros.get(token[2:-1]) or []) if is_macro else [token]
    return command


def replace_configs(command: list[str], configs: list[str]) -> list[str]:
    """``command`` with its ``--config FILE`` arguments replaced by ``--config`` each of ``configs``,
    in the place of the first old one (so later arguments still override them)."""
    result: list[str] = []
    inserted = skip_next = False
    for token in command:
        if skip_next:
            skip_next = False
        elif token == "--config" or token.startswith("--config="):
            skip_next = token == "--config"
            if not inserted:
                result += [arg for config in configs for arg in ("--config", config)]
                inserted = True
        else:
            result.append(token)
    if not inserted:
        raise ValueError(f"the command has no --config to replace: {command}")
    return result


def run_values(run_config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{param: value}`` from a W&B run config ``{param: {"value": value}}``."""
    return {name: entry["value"] for name, entry in run_config.items()}


# ----------------------------------------------------------------------------------------- state


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """One run of the sweep, as stored in the state file."""

    name: str
    config: dict[str, dict[str, Any]]  # W&B run config: {param: {"value": v}}
    run_dir: str  # relative to the sweep dir
    state: str = "pending"  # pending | running | finished | failed | stopped
    device: str | None = None
    command: list[str] = field(default_factory=list)
    exitcode: int | None = None
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    summary_metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_sweep_run(self, **changes):
        """This run as the engine's ``SweepRun`` (state and metrics included, for bayes)."""
        state = "killed" if self.state == STOPPED else self.state
        fields = dict(name=self.name, config=self.config, state=state, exitcode=self.exitcode)
        fields |= dict(summary_metrics=self.summary_metrics, history=self.history)
        return import_sweeps().SweepRun(**(fields | changes))


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


def read_metric_history(run_dir: Path) -> list[dict[str, float]]:
    """Rows of the run's CSV log(s) (Lightning's ``metrics.csv``), finite numbers only."""
    history = []
    for path in sorted(run_dir.rglob("metrics.csv")):
        with open(path, newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                values = {k: _number(v) for k, v in row.items() if k}
                values = {k: v for k, v in values.items() if v is not None}
                if values:
                    history.append(values)
    return history


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
