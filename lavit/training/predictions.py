"""``lavit predict`` writes its predictions: one CSV file per run, one row per image.

:class:`PredictionWriter` (``--predict.*``) collects what ``LaViTModule.predict_step`` returns
and writes ``predictions.csv`` in the run's version folder (or ``--predict.output``): per image
its id (the file path for images on disk, else the row index of the split), the predicted class
name and its probability, the top-k names with their probabilities, and, when the data has
labels, the label and whether the prediction is correct. Under DDP every rank's rows are gathered
to rank 0, which writes the one file, each image once, in the dataset's order.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lavit.training.callbacks import run_file_dir
from lavit.training.options import PositiveInt, check_arguments

__all__ = ["PREDICTIONS_FILE", "PredictionWriter"]

PREDICTIONS_FILE = "predictions.csv"


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions of ``lavit predict`` to a CSV file (see the module docstring).

    Args:
        output: the file to write; default: ``predictions.csv`` in the run's version folder.
        top_k: how many of the most probable classes each row lists.
    """

    def __init__(self, output: str | None = None, top_k: PositiveInt = 5) -> None:
        super().__init__(write_interval="batch")
        check_arguments(PredictionWriter.__init__, locals())
        self.output = output
        self.top_k = top_k
        self.rows: list[dict[str, Any]] = []
        self.path: Path | None = None

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: list[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        loaders = trainer.predict_dataloaders
        dataset = (loaders[dataloader_idx] if isinstance(loaders, list) else loaders).dataset
        names = getattr(trainer.datamodule, "class_names", None)
        probs = prediction["probs"].float().cpu()
        labels = batch[1].cpu() if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        k = min(self.top_k, probs.shape[-1])
        top_probs, top_classes = probs.topk(k, dim=-1)  # (B, k)
        indices = batch_indices if batch_indices is not None else range(len(probs))
        for i, index in enumerate(indices):
            name = [names[c] if names else str(c) for c in top_classes[i].tolist()]
            row: dict[str, Any] = {
                "index": int(index),
                "id": dataset.item_id(int(index)) if hasattr(dataset, "item_id") else int(index),
                "predicted": name[0],
                "probability": round(float(top_probs[i, 0]), 6),
                f"top{k}": " ".join(name),
                f"top{k}_probabilities": " ".join(f"{p:.6f}" for p in top_probs[i].tolist()),
            }
            label = int(labels[i]) if labels is not None else -1
            if label >= 0:
                row["label"] = names[label] if names else str(label)
                row["correct"] = int(top_classes[i, 0]) == label
            self.rows.append(row)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not trainer.is_global_zero:
            return
        unique = {row["index"]: row for row in rows}  # a padded sampler repeats some images
        self.path = Path(self.output) if self.output else run_file_dir(trainer) / PREDICTIONS_FILE
        rows = [unique[i] for i in sorted(unique)]
        columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "index"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        rank_zero_info(f"wrote {len(rows)} predictions to {self.path}")
