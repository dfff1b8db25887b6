"""Training throughput and the whole run's ETA, logged and shown in the progress bar.

Logged at the trainer's logging steps, measured over the last ``every_n_batches`` training
batches or fewer (default: ``log_every_n_steps``):

* ``train/images_per_s``: images trained per second, wall clock between batch ends (so data
  loading counts, validation and epoch boundaries do not), all devices together;
* ``train/macs_per_s``: the same times the training MACs of one image (forward + backward,
  counted once when fit starts with the project's MAC counter, ``lavit.analysis.flops``);
* ``train/eta_s``: seconds until the last training step, from this fit's average time per step
  so far (validation included), for the whole run, not the epoch.

The progress bar shows them as ``img/s``, ``MAC/s`` and ``ETA`` next to the loss.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.attention import SDPBackend, sdpa_kernel

from lavit.analysis.flops import flop_counter
from lavit.training.options import PositiveInt, check_arguments
from lavit.units import format_duration, format_si

__all__ = ["TrainingProgress", "training_macs_per_image"]


def training_macs_per_image(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> int:
    """MACs of one training step on one image (forward + backward), counted on ``model``.

    Runs in eval mode (no batch-norm statistics or dropout change) and leaves the gradients as
    they were.
    """
    param = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    grads = [p.grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter:
            model(x).float().sum().backward()
    finally:
        for p, grad in zip(model.parameters(), grads, strict=True):
            p.grad = grad
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _batch_size(batch: Any) -> int:
    """Images in a batch: ``(images, targets)`` with a batched tensor or a list of images."""
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    if hasattr(images, "shape"):
        return int(images.shape[0])
    return len(images) if isinstance(images, (list, tuple)) else 0


class TrainingProgress(Callback):
    """Images/s, achieved MACs/s and the run's ETA during fit (see the module docstring).

    Args:
        every_n_batches: measure over windows of this many training batches; default: the
            trainer's ``log_every_n_steps``.
        count_macs: count the training MACs per image when fit starts (for ``train/macs_per_s``).
    """

    def __init__(self, every_n_batches: PositiveInt | None = None, count_macs: bool = True) -> None:
        check_arguments(TrainingProgress.__init__, locals())
        self.every_n_batches = every_n_batches
        self.count_macs = count_macs
        self.train_macs: int | None = None
        self.images_per_s: float | None = None
        self.eta_s: float | None = None
        self._window_start: float | None = None
        self._window_images = 0
        self._window_batches = 0
        self._fit_start = 0.0
        self._start_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the strategy wraps the model (DDP): a backward here touches no reducer.
        if stage != "fit" or not self.count_macs or self.train_macs is not None:
            return
        model = getattr(pl_module, "model", None)
        # The side the data feeds (the data module's), else the model's own (a LaViT's).
        side = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("img_size")
        side = side or getattr(model, "img_size", None)
        side = side[0] if isinstance(side, (tuple, list)) else side
        if isinstance(model, torch.nn.Module) and side:
            self.train_macs = training_macs_per_image(model, (3, int(side), int(side)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.monotonic()
        self._start_step = trainer.global_step
        bar = trainer.progress_bar_callback
        if bar is not None and not getattr(bar, "_shows_training_progress", False):
            show = bar.get_metrics

            # The bar's documented hook for its items, on this instance: whichever bar it is.
            def get_metrics(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
                return {**show(trainer, pl_module), **self.bar_items()}

            bar.get_metrics = get_metrics
            bar._shows_training_progress = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start = None  # the first batch of an epoch starts the window

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = time.monotonic()
        done = trainer.global_step - self._start_step
        total = trainer.estimated_stepping_batches
        if done > 0 and math.isfinite(total):
            self.eta_s = (now - self._fit_start) / done * max(0, total - trainer.global_step)
        if self._window_start is None:  # the epoch's first batch: its end starts the window
            self._window_start, self._window_images, self._window_batches = now, 0, 0
            return
        self._window_images += _batch_size(batch) * trainer.world_size
        self._window_batches += 1
        self.images_per_s = self._window_images / max(now - self._window_start, 1e-9)
        metrics = {"train/images_per_s": self.images_per_s}
        if self.train_macs:
            metrics["train/macs_per_s"] = self.images_per_s * self.train_macs
        if self.eta_s is not None:
            metrics["train/eta_s"] = self.eta_s
        # Logged every batch: Lightning keeps the values of its own logging steps.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self._window_batches >= (self.every_n_batches or trainer.log_every_n_steps or 1):
            self._window_start, self._window_images, self._window_batches = now, 0, 0

    def bar_items(self) -> dict[str, str]:
        """What the progress bar shows: ``img/s``, ``MAC/s`` (with the count) and ``ETA``."""
        items = {}
        if self.images_per_s is not None:
            items["img/s"] = f"{self.images_per_s:.0f}"
            if self.train_macs:
                items["MAC/s"] = format_si(self.images_per_s * self.train_macs)
        if self.eta_s is not None:
            items["ETA"] = format_duration(self.eta_s)
        return items
