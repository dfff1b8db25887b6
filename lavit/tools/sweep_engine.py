"""W&B's sweep engine and command expansion, as ``lavit sweep`` uses them offline.

The ``sweeps`` package (the engine behind W&B's sweep server: schema, grid/random/bayes proposals,
hyperband) and the agent's own macro expansion of a sweep file's ``command``, so that a run of
``lavit sweep`` gets exactly the arguments ``wandb agent`` would give it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_COMMAND",
    "SweepEngineError",
    "agent_command",
    "import_sweeps",
    "load_sweep_config",
    "override_args",
    "replace_configs",
    "run_values",
]

# What `wandb agent` puts in the command when the sweep file has none.
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
SWEEP_EXTRA_INSTALL = "pip install 'lavit[sweep]' (in a checkout: pip install -e '.[sweep]')"


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
        f"`lavit[sweep]`: {SWEEP_EXTRA_INSTALL} ({problem})"
    )


def _wandb_command_helpers():
    """W&B's own expansion of a sweep command (a private module: guarded, with what to do)."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args
    except ImportError as err:
        import wandb

        raise SweepEngineError(
            f"wandb {getattr(wandb, '__version__', '?')} lacks wandb.sdk.launch.sweeps.utils, the "
            "private W&B module lavit sweep uses to expand a sweep's command exactly as `wandb "
            "agent` does; install the wandb version lavit is tested with: pip install "
            f"'wandb==0.31.0' ({err})"
        ) from err
    return create_sweep_command, create_sweep_command_args


# ---------------------------------------------------------------------------------------- config


def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """Read a sweep file and validate it against W&B's sweep-config schema (raises if invalid)."""
    sweeps = import_sweeps()
    with open(path, encoding="utf-8") as stream:
        config = yaml.safe_load(stream)
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: a sweep file must be a YAML mapping, got {type(config).__name__}"
        )
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        raise ValueError(f"{path} is not a valid W&B sweep config:\n  " + "\n  ".join(violations))
    return config


def agent_command(
    command_template: list[str] | None,
    run_config: dict[str, dict[str, Any]],
    program: str | None = None,
    interpreter: str = "python",
) -> list[str]:
    """The command ``wandb agent`` runs for one proposed run, as a list of arguments.

    Uses W&B's own helpers for the macro values, so ``${args}`` renders exactly as the agent does
    (``--key=value``, with ``str()`` of the value: a list becomes ``[1, 2, 1, 1]``, a bool
    ``True``). A token that is exactly ``${name}`` is replaced by that macro's list (dropped when
    empty), ``${envvar:NAME}`` by the environment variable; anything else is kept verbatim.

    Args:
        command_template: the sweep file's ``command`` (W&B's default when ``None``).
        run_config: the proposed run's config, ``{param: {"value": v}}``.
        program: the sweep file's ``program`` (for ``${program}``).
        interpreter: ``${interpreter}``; the agent uses ``python`` (the one on PATH).
    """
    create_sweep_command, create_sweep_command_args = _wandb_command_helpers()
    template = create_sweep_command(list(command_template or DEFAULT_COMMAND))
    macros: dict[str, Any] = create_sweep_command_args({"args": run_config})
    macros["interpreter"] = [interpreter]
    macros["program"] = [program] if program else []
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    command: list[str] = []
    for token in map(str, template):
        if token.startswith("${") and token.endswith("}"):
            command += macros.get(token[2:-1]) or []
        else:
            command.append(token)
    return command


def replace_configs(command: list[str], configs: list[str]) -> list[str]:
    """``command`` with its ``--config FILE`` arguments replaced by ``--config`` each of ``configs``.

    The new ones take the place of the first old one, so that later arguments still override them
    (e.g. the sweep file's CIFAR-10 config swapped for ``experiments/base.yaml`` for a quick test).
    """
    result: list[str] = []
    inserted = False
    skip_next = False
    for token in command:
        if skip_next:
            skip_next = False
            continue
        if token == "--config" or token.startswith("--config="):
            skip_next = token == "--config"
            if not inserted:
                for config in configs:
                    result += ["--config", config]
                inserted = True
            continue
        result.append(token)
    if not inserted:
        raise ValueError(f"the command has no --config to replace: {command}")
    return result


def run_values(run_config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{param: value}`` from a W&B run config ``{param: {"value": value}}``."""
    return {name: entry["value"] for name, entry in run_config.items()}


def override_args(overrides: list[str]) -> list[str]:
    """``key=value`` overrides as the CLI's ``--key=value`` arguments (a leading ``--`` is kept)."""
    args = []
    for override in overrides:
        if "=" not in override.lstrip("-"):
            raise ValueError(f"--override expects key=value, got {override!r}")
        args.append(override if override.startswith("--") else f"--{override}")
    return args
