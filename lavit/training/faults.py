"""What a run does when something goes wrong: pre-emption, divergence, and injected faults.

* :class:`PreemptionCheckpoint`: on SIGTERM (what a cluster scheduler sends before pre-empting a
  job) Lightning finishes the current batch and raises ``SIGTERMException``; this callback then
  saves ``last.ckpt`` (atomically, through the CLI's checkpoint IO) and the CLI exits with
  :data:`EXIT_PREEMPTED`. ``--ckpt_path last`` resumes from there.
* :class:`NonFiniteGuard`: a non-finite loss or gradient is caught before the optimizer step, so
  the weights, and therefore every checkpoint, stay finite. ``policy="stop"`` ends the run with a
  :class:`NonFiniteLossError` naming the step and the last good checkpoint (exit code
  :data:`EXIT_DIVERGED`); ``policy="skip"`` drops that update, counts it and logs the count as
  ``train/nonfinite_skipped``.
* :class:`FaultInjection`: test-only faults, active only when ``LAVIT_FAULT_INJECT`` is set, e.g.
  ``LAVIT_FAULT_INJECT=crash:rank=1:step=2`` or ``nan_loss:step=3,slow_checkpoint:seconds=2``
  (``name[:key=value...]``, comma-separated; see :data:`FAULTS`).
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "DDPOptions",
    "EXIT_CONFIG_ERROR",
    "EXIT_DIVERGED",
    "EXIT_PREEMPTED",
    "FAULTS",
    "FAULT_ENV",
    "FaultInjection",
    "InjectedFault",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PreemptionCheckpoint",
    "StopOtherRanks",
    "distributed_failure",
    "ddp_strategy",
    "fault_injection_callbacks",
    "injected_fault",
    "injected_faults",
    "last_good_checkpoint",
]

EXIT_CONFIG_ERROR = 2  # a bad option, data or checkpoint, reported before training
EXIT_DIVERGED = 3  # a non-finite loss stopped training (policy "stop")
EXIT_PREEMPTED = 75  # SIGTERM: last.ckpt saved, resume with --ckpt_path last (EX_TEMPFAIL)

FAULT_ENV = "LAVIT_FAULT_INJECT"
FAULTS = {
    "nan_loss": "fill the input batch with NaN at global step `step` (on rank `rank`, default all)",
    "crash": "raise an exception at global step `step` (on rank `rank`, default all)",
    "exit": "kill the process (os._exit(`code`), default 13) at global step `step` on rank `rank`",
    "hang": "stop responding (sleep forever) at global step `step` on rank `rank`",
    "slow_checkpoint": "write checkpoints slowly over `seconds` (default 2), announced on stderr",
}


class InjectedFault(RuntimeError):
    """The exception of the ``crash`` fault."""


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names the step and the last good checkpoint."""


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


def injected_fault(name: str) -> dict[str, str] | None:
    """The parameters of fault ``name`` if ``LAVIT_FAULT_INJECT`` asks for it, else ``None``."""
    return injected_faults().get(name)


def fault_injection_callbacks() -> list[Callback]:
    """``[FaultInjection(...)]`` when ``LAVIT_FAULT_INJECT`` asks for step faults, else ``[]``."""
    faults = {k: v for k, v in injected_faults().items() if k != "slow_checkpoint"}
    return [FaultInjection(faults)] if faults else []


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class FaultInjection(Callback):
    """Test-only: injects the faults of ``LAVIT_FAULT_INJECT`` at the start of a training batch."""

    def __init__(self, faults: dict[str, dict[str, str]]) -> None:
        self.faults = faults

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
            elif name == "hang":
                _say(f"lavit-fault: hanging on {where}")
                while True:
                    time.sleep(60)


class PreemptionCheckpoint(Callback):
    """On SIGTERM during ``fit``, saves ``last.ckpt`` in the checkpoint folder (then the run stops).

    Lightning 2.6 catches SIGTERM itself (and forwards it to its DDP children): it lets the current
    batch finish, then raises ``SIGTERMException`` (a ``SystemExit``) from the loop, which reaches
    callbacks through ``on_exception`` while the loop state is consistent. Without this callback
    the process would exit with code 0 and nothing saved since the last checkpoint.
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
            previous = callback.last_model_path
            path = previous if previous else os.path.join(callback.dirpath, name)
            callback.last_model_path = path  # recorded in the checkpoint's callback state
        else:
            path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            _say(
                f"SIGTERM: saved {path} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); resume with --ckpt_path last"
            )


class StopOtherRanks(Callback):
    """When this process fails, kills the other ranks it launched instead of leaving them behind.

    Lightning's DDP launcher (``--trainer.strategy=ddp`` started as one command) starts ranks
    1..N-1 of a node as child processes of rank 0 and kills everything when a *child* dies, but
    when rank 0 itself fails (e.g. its collective timed out because a child hangs) the children
    are left running, holding the job (and its GPUs) forever.
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
            _say(
                f"rank {trainer.global_rank} failed ({type(exception).__name__}): stopping the "
                f"{len(children)} other rank(s) it launched"
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


def _grads_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every gradient is finite (norms fused per device; no sync)."""
    norms = torch._foreach_norm(grads)
    return torch.stack([n.to(grads[0].device) for n in norms]).isfinite().all()


def _checkpoint_step(path: str) -> int | None:
    from lavit.training.checkpoint_io import CheckpointError, load_checkpoint_file

    try:
        return int(load_checkpoint_file(path, mmap=True).get("global_step", -1))
    except CheckpointError:
        return None


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """``"<path> (global step N)"`` of the newest checkpoint this run saved, or a sentence saying none."""
    callback = trainer.checkpoint_callback
    paths = [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
    existing = [p for p in paths if p and Path(p).is_file()]
    if not existing:
        return "none (no checkpoint was saved before this step)"
    path = max(existing, key=os.path.getmtime)
    step = _checkpoint_step(path)
    return f"{path}" + (f" (global step {step})" if step is not None else "")


class NonFiniteGuard(Callback):
    """Keeps NaN/inf out of the weights: checks the loss and gradients before each optimizer step.

    Under DDP the decision is taken jointly (one all-reduced flag), so every rank stops or skips
    together. With a ``GradScaler`` (16-mixed) only the loss is checked: the scaler already skips
    steps with inf gradients.

    Args:
        policy: ``"stop"``: stop before the update with a :class:`NonFiniteLossError` naming the
            step and the last good checkpoint; ``"skip"``: drop this update (the batch counts as
            a step), count it and log ``train/nonfinite_skipped``.
        max_consecutive_skips: under ``"skip"``, stop anyway after this many non-finite batches
            in a row (the run has diverged, not met one bad batch).
    """

    def __init__(
        self, policy: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 20
    ) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"policy must be 'stop' or 'skip', got {policy!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self._consecutive = 0
        self._loss_finite: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        checks = [] if self._loss_finite is None else [self._loss_finite]
        self._loss_finite = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            if grads:
                checks.append(_grads_finite(grads))
        if not checks:
            return
        finite = bool(torch.stack([c.to(checks[0].device) for c in checks]).all())
        if trainer.world_size > 1:  # any rank's non-finite loss stops or skips every rank
            finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if finite:
            self._consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # nothing reaches the weights
        loss = float(self._loss) if self._loss is not None else math.nan
        where = (
            f"global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx})"
        )
        self._consecutive += 1
        if self.policy == "skip" and self._consecutive <= self.max_consecutive_skips:
            self.skipped += 1
            rank_zero_warn(
                f"Non-finite loss ({loss}) or gradients at {where}: skipped this update "
                f"({self.skipped} skipped so far)."
            )
            for logger in trainer.loggers:
                logger.log_metrics({"train/nonfinite_skipped": self.skipped}, trainer.global_step)
            return
        reason = (
            f"{self._consecutive} non-finite batches in a row (the last at {where})"
            if self.policy == "skip"
            else f"non-finite loss ({loss}) or gradients at {where}"
        )
        raise NonFiniteLossError(
            f"training stopped: {reason}; stopped before the update, so no NaN weights were saved. "
            f"Last good checkpoint: {last_good_checkpoint(trainer)}. Resume from it with "
            "--ckpt_path last (e.g. with a lower --model.lr or --trainer.gradient_clip_val=1.0), "
            "or set --nonfinite.policy=skip to skip such batches."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


@dataclass
class DDPOptions:
    """Distributed settings of a run (the ``--ddp.*`` options of the CLI).

    Args:
        timeout: seconds a collective operation (gradient all-reduce, barrier) waits for the other
            ranks before failing: a rank that crashed or hangs ends the whole job within about
            this time instead of blocking it. Applies to ``--trainer.strategy=ddp`` (and the
            other ``ddp*`` strategy names).
    """

    timeout: float = 600.0


def ddp_strategy(name: Any, timeout: float) -> Any | None:
    """The strategy named ``name`` with a collective ``timeout``, if it is a DDP one, else ``None``."""
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    if not isinstance(name, str) or name not in StrategyRegistry:
        return None
    entry = StrategyRegistry[name]
    if not issubclass(entry["strategy"], DDPStrategy):
        return None
    return entry["strategy"](**{**entry["init_params"], "timeout": timedelta(seconds=timeout)})
