"""The non-finite guard: no NaN or inf reaches the weights, and so none reaches a checkpoint.

A non-finite loss or gradient is caught before the optimizer step. ``policy="stop"`` (default)
ends the run with a :class:`~lavit.errors.NonFiniteLossError` naming the step and the last good
checkpoint (the CLI exits with :data:`~lavit.errors.EXIT_DIVERGED`); ``policy="skip"`` drops that
update, counts it and logs the count as ``train/nonfinite_skipped``. (A checkpoint with NaN
weights is also refused on write, by :class:`~lavit.training.checkpoint_io.AtomicCheckpointIO`.)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lavit.errors import NonFiniteLossError
from lavit.training.checkpointing import last_good_checkpoint
from lavit.training.options import check_arguments

__all__ = ["NonFiniteGuard"]


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
        self, policy: Literal["stop", "skip"] = "stop", max_consecutive_skips: PositiveInt = 20
    ) -> None:
        check_arguments(NonFiniteGuard.__init__, locals())
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
                checks.append(torch.nn.utils.get_total_norm(grads, foreach=True).isfinite())
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
