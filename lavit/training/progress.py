"""Training throughput: Lightning's ``ThroughputMonitor`` counting images, with lavit's FLOPs.

Logged at the trainer's logging steps once ``window_size`` batches were seen, under Lightning's
names: ``train/device/samples_per_sec`` (images per second and device; all devices together:
``train/samples_per_sec``), ``train/device/flops_per_sec`` (the training FLOPs of one image,
forward + backward, counted once with ``lavit.analysis.flops``), ``train/device/mfu`` where
Lightning knows the accelerator's peak, and the same per evaluation stage (no FLOPs there).
``train/eta_s``, the whole run's remaining time, is logged and shown in the progress bar.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lavit.analysis.flops import flop_counter
from lavit.errors import OptionError

__all__ = ["Throughput", "images_in_batch", "training_macs_per_image"]


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


def images_in_batch(batch: Any) -> int:
    """Images in a batch: ``(images, targets)`` with a batched tensor or a list of images."""
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(images.shape[0]) if hasattr(images, "shape") else len(images)


class Throughput(ThroughputMonitor):
    """``ThroughputMonitor`` over images, with FLOPs per training batch and the run's ETA.

    Args:
        window_size: batches the rolling averages span (at least 2).
        count_flops: count the training FLOPs of one image when fit starts (for
            ``train/device/flops_per_sec``).
    """

    def __init__(self, window_size: int = 20, count_flops: bool = True) -> None:
        if window_size < 2:
            raise OptionError("window_size", window_size, "must be >= 2")
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size)
        self.count_flops = count_flops
        self.flops_per_image: int | None = None
        self.fit_started, self.start_step = 0.0, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        pl_module.flops_per_batch = None  # what ThroughputMonitor reads; set per training batch
        model = getattr(pl_module, "model", None)
        side = getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("img_size")
        side = side or getattr(model, "img_size", None)  # the data's side, else the model's
        side = side[0] if isinstance(side, (tuple, list)) else side
        # Before the strategy wraps the model (DDP): a backward here touches no reducer.
        if stage == "fit" and self.count_flops and isinstance(model, torch.nn.Module) and side:
            self.flops_per_image = 2 * training_macs_per_image(model, (3, int(side), int(side)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_started, self.start_step = time.monotonic(), trainer.global_step
        super().on_train_start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.flops_per_batch = None  # counted for training steps only
        super().on_validation_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.flops_per_image:
            pl_module.flops_per_batch = self.flops_per_image * images_in_batch(batch)
        # Lightning's progress bar shows the epoch's remaining time only; the run's is ours.
        done, total = trainer.global_step - self.start_step, trainer.estimated_stepping_batches
        if done > 0 and math.isfinite(total):
            left = (
                (time.monotonic() - self.fit_started) / done * max(0, total - trainer.global_step)
            )
            pl_module.log("train/eta_s", left, prog_bar=True, on_step=True, batch_size=1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
