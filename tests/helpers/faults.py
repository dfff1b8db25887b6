"""Fault injection for tests: ``lavit`` with crashes, NaN batches, hangs or slow checkpoint writes.

A test runs ``python tests/helpers/faults.py <lavit arguments>`` (or :func:`main` in-process) with
``LAVIT_FAULT_INJECT=name[:key=value...][,...]``, e.g. ``crash:rank=1:step=2`` or
``nan_loss:step=3,slow_checkpoint:seconds=2`` (see :data:`FAULTS`). :func:`main` adds the faults
to the command line through the CLI's ordinary extension points, a callback
(:class:`FaultInjection`) and a checkpoint plugin (:class:`SlowCheckpointIO`), then runs
``lavit.cli.main``; under DDP every rank re-runs the same command and gets the same faults.
``python -m lavit`` itself never reads ``LAVIT_FAULT_INJECT``; this file is not installed with it.
"""

from __future__ import annotations

import io
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lavit.training.checkpoint_io import AtomicCheckpointIO

__all__ = [
    "FAULTS",
    "FAULT_ENV",
    "FaultInjection",
    "InjectedFault",
    "SlowCheckpointIO",
    "fault_arguments",
    "injected_faults",
    "main",
]

FAULT_ENV = "LAVIT_FAULT_INJECT"
FAULTS = {
    "nan_loss": "fill the input batch with NaN at global step `step` (on rank `rank`, default all)",
    "crash": "raise an exception at global step `step` (on rank `rank`, default all)",
    "exit": "kill the process (os._exit(`code`), default 13) at global step `step` on rank `rank`",
    "hang": "stop responding (sleep forever) at global step `step` on rank `rank`",
    "sigterm": "send the process SIGTERM (a scheduler's pre-emption) at global step `step`",
    "slow_checkpoint": "write checkpoints slowly over `seconds` (default 2), announced on stderr",
}
STEP_FAULTS = ("nan_loss", "crash", "exit", "hang", "sigterm")


class InjectedFault(RuntimeError):
    """The exception of the ``crash`` fault."""


def injected_faults() -> dict[str, dict[str, str]]:
    """The faults ``LAVIT_FAULT_INJECT`` asks for: ``{name: {key: value}}`` (empty when unset)."""
    faults: dict[str, dict[str, str]] = {}
    for item in os.environ.get(FAULT_ENV, "").split(","):
        if not item.strip():
            continue
        name, *pairs = item.strip().split(":")
        if name not in FAULTS:
            raise ValueError(f"{FAULT_ENV}: unknown fault {name!r}; known: {sorted(FAULTS)}")
        params = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"{FAULT_ENV}: expected key=value in {item!r}, got {pair!r}")
            params[key] = value
        faults[name] = params
    return faults


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class FaultInjection(Callback):
    """Injects the step faults of ``LAVIT_FAULT_INJECT`` at the start of a training batch."""

    def __init__(self) -> None:
        self.faults = {k: v for k, v in injected_faults().items() if k in STEP_FAULTS}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for name, params in self.faults.items():
            if int(params.get("step", 0)) != trainer.global_step:
                continue
            if "rank" in params and int(params["rank"]) != trainer.global_rank:
                continue
            where = f"rank {trainer.global_rank} at global step {trainer.global_step}"
            if name == "nan_loss":
                _say(f"lavit-fault: NaN input batch on {where}")
                batch[0].fill_(math.nan)
            elif name == "crash":
                raise InjectedFault(f"injected crash ({FAULT_ENV}) on {where}")
            elif name == "exit":
                _say(f"lavit-fault: process exits on {where}")
                os._exit(int(params.get("code", 13)))
            elif name == "sigterm":
                _say(f"lavit-fault: SIGTERM on {where}")
                os.kill(os.getpid(), signal.SIGTERM)
            elif name == "hang":
                _say(f"lavit-fault: hanging on {where}")
                while True:
                    time.sleep(60)


class SlowCheckpointIO(AtomicCheckpointIO):
    """The CLI's checkpoint IO, writing each file over ``seconds`` in 20 flushed chunks.

    Announces each write on stderr, so that a test can kill the process in the middle of it.
    """

    def __init__(self, seconds: float = 2.0) -> None:
        super().__init__()
        self.seconds = seconds

    def write(self, checkpoint: dict[str, Any], file: BinaryIO, target: Path) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        _say(f"lavit-fault: writing {target} slowly ({len(data)} bytes)")
        chunks = 20
        size = -(-len(data) // chunks)
        for start in range(0, len(data), size):
            file.write(data[start : start + size])
            file.flush()
            time.sleep(self.seconds / chunks)


def fault_arguments() -> list[str]:
    """The ``lavit fit`` arguments that install the faults of ``LAVIT_FAULT_INJECT``."""
    faults = injected_faults()
    args = []
    if any(name in faults for name in STEP_FAULTS):
        args.append(f"--trainer.callbacks+={__name__}.FaultInjection")
    if "slow_checkpoint" in faults:
        seconds = float(faults["slow_checkpoint"].get("seconds", 2.0))
        args += [
            f"--trainer.plugins={__name__}.SlowCheckpointIO",
            f"--trainer.plugins.seconds={seconds}",
        ]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """``lavit.cli.main`` with :func:`fault_arguments` appended to the arguments."""
    from lavit.cli import main as lavit_main

    args = list(sys.argv[1:] if argv is None else argv)
    lavit_main([*args, *fault_arguments()])


if __name__ == "__main__":
    main()
