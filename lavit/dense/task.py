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
from lightning.pytorch.utilities import rank_zero_info

from lavit.dense.backbone import DenseBackbone
from lavit.training.optim import optimizer_and_schedule, step_schedule, steps_per_epoch

__all__ = ["DenseTaskModule", "LRSchedule"]

LRSchedule = Literal["step", "poly"]


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
            hp.backbone, out_strides, hp.img_size, hp.drop_path_rate, hp.backbone_kwargs
        )
        if hp.backbone_checkpoint:
            loaded = backbone.load_checkpoint(hp.backbone_checkpoint)
            rank_zero_info(f"backbone: {loaded} tensors from {hp.backbone_checkpoint}")
        return backbone

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to ``self``) not decayed besides norms and biases (timm's
        optimizer factory asks the module it is given): the backbone's own (LaViT: position
        embeddings, Ψ/Θ)."""
        body = self.backbone.body
        prefix = next(name for name, m in self.named_modules() if m is body)
        names = body.no_weight_decay() if hasattr(body, "no_weight_decay") else set()
        return {f"{prefix}.{n}" for n in names}

    # Each task's _evaluate updates its metrics (val_metrics, test_metrics) with one batch.
    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

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
