"""A Lightning callback that measures attention saturation when training ends.

The same measurement as ``lavit analyze`` (:mod:`lavit.analysis.saturation`): per stage, layer pair and
head, the cosine similarity of attention maps over a few validation images. The table (CSV/JSON)
and the plot (PNG) are written to ``<log dir>/saturation/``; with a ``WandbLogger`` they are also
logged as a W&B table and image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from lavit.analysis.saturation import head_means, saturation_table, write_report
from lavit.training.callbacks import run_file_dir
from lavit.training.options import NonNegativeInt, PositiveInt, check_arguments

__all__ = ["AttentionSaturation"]


class AttentionSaturation(Callback):
    """Attention saturation of the trained model, logged at the end of ``fit``.

    Args:
        num_images: validation images to average over (noise if there is no validation data);
            0 switches the measurement off.
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
        self.paths: dict[str, Path] = {}
        self.rows: list[dict[str, Any]] = []

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_images == 0 or getattr(trainer, "fast_dev_run", False):
            return
        model = _analysed_model(pl_module)
        images, source = self._images(trainer, pl_module)
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
        title = (
            f"{type(model).__name__}, step {trainer.global_step}, {len(images)} images ({source})"
        )
        meta = {"step": trainer.global_step, "images": len(images), "image_source": source}
        self.paths = write_report(self.rows, out_dir, title, meta)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                summary = head_means(self.rows)
                columns = list(self.rows[0])
                logger.log_table(
                    "saturation/per_head", columns, [[r[c] for c in columns] for r in self.rows]
                )
                columns = list(summary[0])
                logger.log_table(
                    "saturation/summary", columns, [[r[c] for c in columns] for r in summary]
                )
                logger.log_image("saturation/plot", [str(self.paths["png"])], caption=[title])

    def _images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, str]:
        """Up to ``num_images`` validation images, else Gaussian noise at the model's size."""
        loaders = None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            try:
                loaders = datamodule.val_dataloader()
            except (RuntimeError, NotImplementedError):  # not set up, or no validation split
                loaders = None
        if loaders is None:
            loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        batches, count = [], 0
        as_seen = getattr(datamodule, "evaluation_images", None)  # in-memory batches are uint8
        if loaders is not None:
            for batch in loaders:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                x = as_seen(x) if as_seen is not None else x
                batches.append(x[: self.num_images - count])
                count += len(batches[-1])
                if count >= self.num_images:
                    break
        if batches:
            return torch.cat(batches), "validation images"
        size = getattr(_analysed_model(pl_module), "img_size", (224, 224))
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return torch.randn(self.num_images, 3, *size), "random noise"


def _analysed_model(pl_module: L.LightningModule) -> nn.Module:
    """The weights validation uses (``eval_model``: the EMA when on), else ``model``."""
    for name in ("eval_model", "model"):
        model = getattr(pl_module, name, None)
        if isinstance(model, nn.Module):
            return model
    return pl_module
