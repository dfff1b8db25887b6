"""A Lightning callback that measures attention saturation when training ends.

The measurement of ``lavit analyze`` (:mod:`lavit.analysis.saturation`) on the first validation
images the run saw; the table (CSV/JSON) and plot (PNG) go to ``<log dir>/saturation/``, and to
W&B as a table and an image when a ``WandbLogger`` is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lavit.analysis.saturation import head_means, saturation_table, write_report
from lavit.training.callbacks import run_file_dir
from lavit.training.options import NonNegativeInt, PositiveInt, check_arguments

__all__ = ["AttentionSaturation"]


class AttentionSaturation(Callback):
    """Attention saturation of the trained model (its EMA when on), logged at the end of ``fit``.

    Args:
        num_images: validation images to average over (noise if validation never ran); 0: off.
        batch_size: images per forward pass.
        dirname: folder inside the trainer's log dir for ``saturation.{csv,json,png}``.
    """

    def __init__(
        self,
        num_images: NonNegativeInt = 32,
        batch_size: PositiveInt = 16,
        dirname: str = "saturation",
    ) -> None:
        super().__init__()
        check_arguments(AttentionSaturation.__init__, locals())
        self.num_images = num_images
        self.batch_size = batch_size
        self.dirname = dirname
        self.images: list[torch.Tensor] = []
        self.paths: dict[str, Path] = {}
        self.rows: list[dict[str, Any]] = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # After Lightning's transfer hooks: the images as the model sees them (in-memory uint8
        # batches normalised). The validation loader is not shuffled: any epoch gives the same.
        kept = sum(len(x) for x in self.images)
        if dataloader_idx == 0 and kept < self.num_images:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.images.append(x[: self.num_images - kept].detach().cpu())

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_images == 0 or getattr(trainer, "fast_dev_run", False):
            return
        model = getattr(pl_module, "eval_model", getattr(pl_module, "model", pl_module))
        if self.images:
            images, source = torch.cat(self.images), "validation images"
        else:
            size = getattr(model, "img_size", (224, 224))
            size = size if isinstance(size, (tuple, list)) else (size, size)
            images, source = torch.randn(self.num_images, 3, *size), "random noise"
        was_training = model.training
        try:
            self.rows = saturation_table(model, images.to(pl_module.device).split(self.batch_size))
        except ValueError as err:  # a model without readable attention: nothing to log
            rank_zero_warn(f"AttentionSaturation: {err}")
            return
        finally:
            model.train(was_training)
        if not self.rows:
            return
        out_dir = run_file_dir(trainer) / self.dirname  # not trainer.log_dir: it broadcasts
        step = trainer.global_step
        title = f"{type(model).__name__}, step {step}, {len(images)} images ({source})"
        meta = {"step": step, "images": len(images), "image_source": source}
        self.paths = write_report(self.rows, out_dir, title, meta)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for name, rows in (("per_head", self.rows), ("summary", head_means(self.rows))):
                    columns = list(rows[0])
                    data = [[row[c] for c in columns] for row in rows]
                    logger.log_table(f"saturation/{name}", columns, data)
                logger.log_image("saturation/plot", [str(self.paths["png"])], caption=[title])
