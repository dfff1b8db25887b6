"""DDP failure handling: a rank that crashes or hangs ends the whole job, with one clear line.

* :class:`DDPOptions` (``--ddp.*``) and :func:`ddp_strategy`: a ``ddp*`` strategy chosen by name
  gets a collective timeout, so a rank waiting for a dead or hung peer fails within
  ``--ddp.timeout`` seconds instead of blocking the job forever.
* :class:`StopOtherRanks`: when rank 0 fails, it kills the ranks it launched.
* :func:`distributed_failure`: the collective's error that follows, as one line for the CLI.
"""

from __future__ import annotations

import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lavit.training.options import PositiveSeconds

__all__ = ["DDPOptions", "StopOtherRanks", "ddp_strategy", "distributed_failure"]


class StopOtherRanks(Callback):
    """When this process fails, kills the other ranks it launched instead of leaving them behind.

    Lightning's DDP launcher kills every rank when a child rank dies, but leaves the children
    running (holding the job and its GPUs) when rank 0 itself fails.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _DISTRIBUTED.update(world_size=trainer.world_size, rank=trainer.global_rank)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):  # Lightning forwards SIGTERM to them itself
            return
        launcher = getattr(trainer.strategy, "launcher", None)
        children = getattr(launcher, "procs", None)
        if children and any(child.poll() is None for child in children):
            print(
                f"rank {trainer.global_rank} failed ({type(exception).__name__}): stopping the "
                f"{len(children)} other rank(s) it launched",
                file=sys.stderr,
                flush=True,
            )
            launcher.kill(signal.SIGKILL)


# World size and rank of the run in this process (Lightning's teardown unsets WORLD_SIZE).
_DISTRIBUTED = {"world_size": 1, "rank": 0}

# Errors of a collective operation whose peer died or stopped answering (gloo, NCCL).
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Timed out waiting|"
    r"Watchdog caught collective operation timeout|NCCL communicator was aborted",
)


def distributed_failure(err: BaseException) -> str | None:
    """A one-line description if ``err`` is a collective failing because another rank did."""
    import torch.distributed as dist

    name = type(err).__name__
    if not (
        _DISTRIBUTED["world_size"] > 1 and dist.is_available() and isinstance(err, RuntimeError)
    ):
        return None
    message = str(err)
    if not (_PEER_FAILURE.search(message) or name == "DistBackendError"):
        return None
    rank = _DISTRIBUTED["rank"]
    detail = next((line.strip() for line in message.splitlines() if line.strip()), name)
    return (
        f"rank {rank}: stopped because another rank failed or did not answer within "
        f"--ddp.timeout ({detail}); that rank's own error, if it printed one, is above"
    )


@dataclass
class DDPOptions:
    """Distributed settings of a run (the ``--ddp.*`` options of the CLI).

    Args:
        timeout: seconds a collective operation (gradient all-reduce, barrier) waits for the other
            ranks before failing: a rank that crashed or hangs ends the whole job within about
            this time instead of blocking it. Applies to ``--trainer.strategy=ddp`` (and the
            other ``ddp*`` strategy names).
    """

    timeout: PositiveSeconds = 600.0


def ddp_strategy(name: Any, timeout: float) -> Any | None:
    """The strategy named ``name`` with a collective ``timeout``, if it is a DDP one, else ``None``."""
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    if not isinstance(name, str) or name not in StrategyRegistry:
        return None
    entry = StrategyRegistry[name]
    if not issubclass(entry["strategy"], DDPStrategy):
        return None
    return entry["strategy"](**{**entry["init_params"], "timeout": timedelta(seconds=timeout)})
