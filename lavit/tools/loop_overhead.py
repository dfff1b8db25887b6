"""The Lightning training loop's step time against a bare PyTorch loop (``lavit bench --loop-overhead``).

What Lightning costs per step, on the same model and batches: the loop of a minimal
``LightningModule`` and of the project's ``LaViTModule``, each paired step by step with a bare
loop (forward, loss, backward, AdamW, zero_grad, one ``.item()``) on a copy of the model.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lavit.models.factory import ModelSpec, create_model
from lavit.tools.timing import autocast, median
from lavit.training.module import LaViTModule

__all__ = ["loop_overhead"]


def loop_overhead(
    spec: ModelSpec,
    img_size: int,
    batch_size: int,
    device: torch.device,
    dtype: str,
    steps: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Step time of a Lightning training loop against a bare PyTorch loop, paired step by step.

    Lightning trains the model (a minimal ``LightningModule``, then the project's
    ``LaViTModule``) on in-memory batches (a ``TensorDataset``); after each of its steps a
    callback runs one bare step (forward, loss, backward, AdamW, zero_grad, one ``.item()``) of
    a copy of the model on the same batch, alternately at the start and at the end of the
    batch. A Lightning step is the time between the starts of consecutive batches minus the
    bare step run in between, so data fetching, hooks and logging count. ``overhead_pct`` is the
    median over steps of Lightning ÷ bare, minus one; the first ``warmup`` pairs are dropped.
    """
    torch.manual_seed(0)
    num_classes = 1000
    images = torch.randn(batch_size * steps, 3, img_size, img_size)
    labels = torch.randint(0, num_classes, (batch_size * steps,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, drop_last=True)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[dtype]

    class MinimalModule(L.LightningModule):
        """The least a LightningModule needs: forward, loss, optimizer (and a logged loss)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    class PairedSteps(L.Callback):
        """Times Lightning's steps and, inside each, a bare step of a copy of the model.

        The bare step runs right after a batch starts on even batches and right before it ends
        on odd ones: whichever position is favoured (caches, the other model's gradients still
        in memory) favours both loops alike over the median.
        """

        def __init__(self, model: nn.Module) -> None:
            self.model = copy.deepcopy(model).to(device).train()
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
            self.lightning: list[float] = []
            self.bare: list[float] = []
            self.start: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.start is not None:  # the interval held one bare step: take it out
                self.lightning.append(now - self.start - self.bare[-1])
            self.start = now
            if batch_idx % 2 == 0:
                self.bare_step(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx % 2 == 1:
                self.bare_step(batch)

        def bare_step(self, batch) -> None:
            start = time.perf_counter()
            x, y = (t.to(device) for t in batch)
            with autocast(device, dtype):
                loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss.item()  # what logging a loss costs: one sync
            self.bare.append(time.perf_counter() - start)

    def minimal_module() -> L.LightningModule:
        return MinimalModule(create_model(spec, num_classes, img_size))

    def project_module() -> L.LightningModule:
        return LaViTModule(
            arch=spec.label,
            num_classes=num_classes,
            img_size=img_size if spec.is_lavit else None,
            drop_path_rate=0.0,
            label_smoothing=0.0,
            warmup_epochs=0.0,
            scale_lr_by_batch=False,
        )

    rows = []
    for name, make in (
        ("minimal LightningModule", minimal_module),
        ("LaViTModule", project_module),
    ):
        module = make()
        timer = PairedSteps(module.model)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        lightning, bare = timer.lightning[warmup:], timer.bare[warmup : len(timer.lightning)]
        rows.append(
            {
                "model": spec.label,
                "loop": name,
                "steps": len(lightning),
                "lightning_step_ms": median(lightning) * 1e3,
                "bare_step_ms": median(bare) * 1e3,
                "overhead_pct": (median([a / b for a, b in zip(lightning, bare, strict=True)]) - 1)
                * 100,
            }
        )
    return rows
