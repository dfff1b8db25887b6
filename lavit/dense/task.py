"""What the detection and segmentation modules share: backbone set-up, AdamW and LR schedules.

Schedules, stepped per optimizer step:

* ``step`` (mmdetection's 1×): linear warm-up from ``warmup_ratio × lr`` over ``warmup_iters``,
  then × ``lr_gamma`` at each epoch of ``lr_milestones`` (8 and 11 of 12).
* ``poly`` (mmsegmentation's): ``(lr − min_lr)·(1 − t/T)^power + min_lr`` over all steps, after
  the optional warm-up.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.optim import param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR

from lavit.dense.backbone import DenseBackbone
from lavit.errors import CheckpointError

__all__ = ["DenseTaskModule", "LRSchedule", "dense_lr_factor"]

LRSchedule = Literal["step", "poly"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dense_lr_factor(
    step: int,
    schedule: str,
    warmup_iters: int,
    warmup_ratio: float,
    milestones: tuple[int, ...],
    gamma: float,
    total_steps: int,
    power: float,
    min_factor: float,
) -> float:
    """LR multiplier at optimizer step ``step`` (``milestones`` already in steps)."""
    if schedule == "step":
        factor = gamma ** sum(step >= m for m in milestones)
    else:
        progress = min(1.0, step / max(1, total_steps))
        factor = (1.0 - min_factor) * (1.0 - progress) ** power + min_factor
    if step < warmup_iters:  # mmcv's linear warm-up: scales the regular factor
        factor *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return factor


class DenseTaskModule(L.LightningModule):
    """Base of :class:`RetinaNetModule` and :class:`SemanticFPNModule` (not used alone)."""

    backbone: DenseBackbone  # a submodule, or a property naming the one inside the model

    @property
    def img_size(self) -> tuple[int, int] | None:
        """The fixed input size, if any (what run_info.json's MAC count runs at)."""
        size = self.hparams.img_size
        return tuple(size) if size is not None else None

    def _build_backbone(self, out_strides: tuple[int, ...]) -> DenseBackbone:
        hp = self.hparams
        backbone = DenseBackbone(
            hp.backbone,
            out_strides=out_strides,
            img_size=hp.img_size,
            drop_path_rate=hp.drop_path_rate,
            model_kwargs=hp.backbone_kwargs,
        )
        if hp.backbone_checkpoint:
            try:
                report = backbone.load_checkpoint(hp.backbone_checkpoint)
            except CheckpointError as err:
                message = str(err)
                if not message.startswith("--model.backbone_checkpoint"):
                    message = f"--model.backbone_checkpoint: {message}"
                raise CheckpointError(message) from None
            rank_zero_info(
                f"backbone: {report.loaded} tensors from {report.path}"
                f"{f' (under {report.prefix!r})' if report.prefix else ''}; converted to this "
                f"input size: {len(report.converted)}; dropped: {', '.join(report.dropped) or '-'}"
            )
        return backbone

    def _no_weight_decay(self) -> set[str]:
        """Parameter names (relative to ``self``) AdamW does not decay, besides norms/biases."""
        prefix = next(name for name, m in self.named_modules() if m is self.backbone)
        return {f"{prefix}.{n}" for n in self.backbone.no_weight_decay()}

    def configure_optimizers(self):
        hp = self.hparams
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        groups = param_groups_weight_decay(
            self, hp.weight_decay, no_weight_decay_list=self._no_weight_decay()
        )
        for group in groups:  # LearningRateMonitor logs lr/decay and lr/no_decay
            group["name"] = "decay" if group["weight_decay"] else "no_decay"
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        batches = self.trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches)
        else:
            steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        schedule = functools.partial(
            dense_lr_factor,
            schedule=hp.lr_schedule,
            warmup_iters=min(hp.warmup_iters, total_steps - 1),
            warmup_ratio=hp.warmup_ratio,
            milestones=tuple(round(e * steps_per_epoch) for e in hp.lr_milestones),
            gamma=hp.lr_gamma,
            total_steps=total_steps,
            power=hp.poly_power,
            min_factor=min(1.0, hp.min_lr / hp.lr),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
