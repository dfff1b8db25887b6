"""Optimizer and learning-rate schedule from timm's factories, for every task's module.

``create_optimizer_v2`` builds any timm optimizer with its parameter groups: no weight decay on
norms, biases and the model's ``no_weight_decay()`` (position embeddings, Ψ/Θ), and layer-wise lr
decay from the model's ``group_matcher``. ``create_scheduler_v2`` builds the schedule, counted in
optimizer updates (Lightning calls :func:`step_schedule` after each): the lr is a function of the
update count, so a resumed run continues it exactly from the checkpoint's step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

__all__ = ["Schedule", "optimizer_and_schedule", "step_schedule", "steps_per_epoch"]

Schedule = Literal["cosine", "tanh", "step", "multistep", "poly", "constant"]


def steps_per_epoch(trainer) -> float:
    """Optimizer updates per epoch (an estimate for iterable data of unknown length)."""
    batches = trainer.num_training_batches
    if math.isfinite(batches) and batches > 0:
        return math.ceil(batches / trainer.accumulate_grad_batches)
    return max(1, int(trainer.estimated_stepping_batches)) / max(1, trainer.max_epochs or 1)


def optimizer_and_schedule(
    model: nn.Module,
    trainer,
    *,
    opt: str,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    sched: Schedule = "cosine",
    warmup_steps: int = 0,
    warmup_lr: float = 0.0,
    warmup_prefix: bool = True,
    min_lr: float = 0.0,
    decay_steps: float = 1,
    milestone_steps: Sequence[int] = (),
    decay_rate: float = 0.1,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: a timm optimizer over ``model``'s trainable
    parameters and a timm schedule over ``trainer.estimated_stepping_batches`` updates.

    ``warmup_prefix``: the decay starts after the warm-up (cosine from ``lr`` at the warm-up's
    end to ``min_lr`` at the last update) rather than under it. ``decay_rate``: the factor at each
    step (``step``, ``multistep``), or the power (``poly``).
    """
    total = max(1, int(trainer.estimated_stepping_batches))  # sets up the data
    warmup = min(warmup_steps, total - 1)
    given = {k: v for k, v in optimizer_kwargs.items() if v is not None}  # None: timm's default
    optimizer = create_optimizer_v2(
        model, opt, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **given
    )
    if layer_decay is None and len(optimizer.param_groups) == 2:  # LearningRateMonitor: lr/decay
        for group in optimizer.param_groups:
            group["name"] = "decay" if group["weight_decay"] else "no_decay"
    # Everything in updates (one "epoch" per update): the schedule then is exact for any length.
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched,
        num_epochs=total - warmup if warmup_prefix else total,
        decay_epochs=decay_steps,
        decay_milestones=list(milestone_steps),
        decay_rate=decay_rate,
        min_lr=min_lr,
        warmup_lr=warmup_lr,
        warmup_epochs=warmup,
        warmup_prefix=warmup_prefix,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    scheduler.step_update(0)  # the first update's lr, with each group's layer-decay lr_scale
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
    }


def step_schedule(module, scheduler, metric: Any = None) -> None:
    """``LightningModule.lr_scheduler_step`` for a timm scheduler: the lr of the next update."""
    scheduler.step_update(num_updates=module.global_step)
