"""What the detection and segmentation modules share: backbone set-up, optimizer and LR schedule.

The optimizer and schedule come from timm's factories (:mod:`lavit.training.optim`), stepped per
optimizer update:

* ``step`` (mmdetection's 1×): linear warm-up from ``warmup_ratio × lr`` over ``warmup_iters``,
  then × ``lr_gamma`` at each epoch of ``lr_milestones`` (8 and 11 of 12): timm's ``multistep``.
* ``poly`` (mmsegmentation's): ``(lr − min_lr)·(1 − t/T)^power + min_lr`` over all updates, the
  optional warm-up replacing its start: timm's ``poly``.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lavit.dense.backbone import DenseBackbone
from lavit.errors import CheckpointError
from lavit.training.optim import optimizer_and_schedule, step_schedule, steps_per_epoch

__all__ = ["DenseTaskModule", "LRSchedule"]

LRSchedule = Literal["step", "poly"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to ``self``) not decayed besides norms and biases (timm's
        optimizer factory asks the module it is given)."""
        prefix = next(name for name, m in self.named_modules() if m is self.backbone)
        return {f"{prefix}.{n}" for n in self.backbone.no_weight_decay()}

    def configure_optimizers(self):
        hp = self.hparams
        per_epoch = steps_per_epoch(self.trainer)
        return optimizer_and_schedule(
            self,
            self.trainer,
            opt="adamw",
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            sched="multistep" if hp.lr_schedule == "step" else "poly",
            warmup_steps=hp.warmup_iters,
            warmup_lr=hp.warmup_ratio * hp.lr,
            warmup_prefix=False,
            min_lr=hp.min_lr,
            milestone_steps=[round(e * per_epoch) for e in hp.lr_milestones],
            decay_rate=hp.lr_gamma if hp.lr_schedule == "step" else hp.poly_power,
        )

    lr_scheduler_step = step_schedule  # a timm scheduler, stepped per update


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
