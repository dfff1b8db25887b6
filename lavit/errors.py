"""The project's exceptions and exit codes, in one place.

Every ``lavit`` command ends with one of these codes (0: done); each error below carries its
``exit_code``:

* :data:`EXIT_FAILURE` (1): anything not listed below (a bug, a crashed DDP peer, ...).
* :data:`EXIT_CONFIG_ERROR` (2): a bad option, data or checkpoint, reported before any work
  starts with one ``error: ...`` line.
* :data:`EXIT_DIVERGED` (3): a non-finite loss stopped training (``--nonfinite.policy=stop``).
* :data:`EXIT_DISK_FULL` (74, ``EX_IOERR``): no space left to write a checkpoint; the previous
  ones are intact, resume with ``--ckpt_path last`` once there is room.
* :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``): SIGTERM; ``last.ckpt`` was saved, resume with
  ``--ckpt_path last``.
* :data:`EXIT_INTERRUPTED` (130): Ctrl-C of a tool that can resume (``lavit sweep``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EXIT_CONFIG_ERROR",
    "EXIT_DISK_FULL",
    "EXIT_DIVERGED",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiskFullError",
    "NonFiniteCheckpointError",
    "NonFiniteLossError",
    "OptionError",
    "one_line",
]

EXIT_FAILURE = 1
EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3
EXIT_DISK_FULL = 74
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class ConfigError(Exception):
    """A configuration value rejected when the model, data or trainer is built."""

    exit_code = EXIT_CONFIG_ERROR


class DataError(ConfigError):
    """The data cannot be loaded as configured (the message may list files, one per line)."""


class OptionError(ValueError):
    """One constructor argument has a value it cannot take.

    ``str()`` reads ``"<option>: invalid value <value> (<allowed>)"``; the CLI prefixes the option
    with its group (``--data.hub_config``), which the constructor does not know.
    """

    def __init__(self, option: str, value: Any, allowed: str) -> None:
        super().__init__(f"{option}: invalid value {value} ({allowed})")
        self.option, self.value, self.allowed = option, value, allowed


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line naming the file."""

    exit_code = EXIT_CONFIG_ERROR


class DiskFullError(OSError):
    """No space left to write a checkpoint; the message names it, the space, and how to resume."""

    exit_code = EXIT_DISK_FULL


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint whose weights hold NaN; it was not written."""


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names the step and the last good checkpoint."""

    exit_code = EXIT_DIVERGED


def one_line(message: str) -> str:
    """An error message as one line: its first three non-empty lines, joined."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else "invalid configuration"
