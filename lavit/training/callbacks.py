"""Callbacks: run metadata (params, MACs, config, versions, git commit) and attention-map images.

``RunMetadata`` logs once per run to every logger (as hyperparameters) and writes
``run_info.json`` in the log dir; at the end of ``fit``/``test`` it adds the final step, metrics
and best checkpoint there, so tools can read a run without parsing logs.
``AttentionMaps`` draws, for a few fixed validation images, where each stage's last layer looks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lavit.analysis.flops import count_macs
from lavit.runtime import cpu_model_name, cpu_tuning_state
from lavit.training.secrets import redact_secrets

__all__ = [
    "AttentionMaps",
    "RunMetadata",
    "git_info",
    "model_input_shape",
    "package_versions",
    "run_file_dir",
]

PACKAGES = (
    "lavit", "torch", "torchvision", "lightning", "timm", "torchmetrics", "datasets", "wandb",
    "jsonargparse", "numpy",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    return {"python": sys.version.split()[0], **{name: installed.get(name) for name in PACKAGES}}


def git_info() -> dict[str, Any] | None:
    """Commit and dirtiness of the checkout this package runs from (``None`` outside git)."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return None


def model_input_shape(model: nn.Module, datamodule: Any = None) -> tuple[int, int, int]:
    """(C, H, W) the model is trained at: LaViT's img_size, else the data's, else timm's cfg."""
    cfg_shape = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    size = getattr(model, "img_size", None) or getattr(datamodule, "hparams", {}).get("img_size")
    size = size or cfg_shape[1:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(getattr(model, "in_chans", cfg_shape[0])), int(size[0]), int(size[1]))


def run_file_dir(trainer: L.Trainer) -> Path:
    """The log dir of this attempt (``<run_dir>/version_N``), or the run dir without loggers.

    What ``trainer.log_dir`` gives, without its broadcast: callers run on rank 0 only, and a
    collective that only rank 0 enters desynchronises (then hangs) a DDP run.
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        log_dir = logger.log_dir
    else:
        log_dir = logger.save_dir if logger is not None else None
    return Path(log_dir or trainer.default_root_dir)


class RunMetadata(Callback):
    """Logs params, MACs, the config, package versions and the git commit once per run.

    Args:
        filename: name of the JSON file written in the log dir.
        count_flops: measure MACs (one forward pass of one image at the training size).
    """

    def __init__(self, filename: str = "run_info.json", count_flops: bool = True) -> None:
        self.filename = filename
        self.count_flops = count_flops
        self.config: dict[str, Any] | None = None  # set by the CLI: the full parsed config
        self.info: dict[str, Any] = {}
        self._setup_at = time.monotonic()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", pl_module)
        shape = model_input_shape(model, trainer.datamodule)
        macs = count_macs(model, shape) if self.count_flops and trainer.is_global_zero else None
        self._setup_at = time.monotonic()
        self.info = {
            "stage": stage,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "run_dir": str(Path(trainer.default_root_dir).resolve()),
            "arch": getattr(pl_module.hparams, "arch", type(model).__name__),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "input_shape": list(shape),
            "macs": macs,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "cpu": cpu_model_name(),
            "torch_threads": torch.get_num_threads(),
            "cpu_tuning": cpu_tuning_state(),
            # image files left out by --data.bad_images=skip (0 when none or not an image folder)
            "skipped_images": getattr(trainer.datamodule, "num_skipped_images", 0),
            "versions": package_versions(),
            "git": git_info(),
        }
        config = redact_secrets(self.config) if self.config is not None else None
        for logger in trainer.loggers:
            logger.log_hyperparams({"meta": self.info, **({"config": config} if config else {})})
        self._write(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # --data.bad_images=lazy: the unreadable images met so far, counted by the data
        met = getattr(trainer.datamodule, "num_unreadable_met", 0)
        if met:
            for logger in trainer.loggers:
                logger.log_metrics({"data/unreadable_images": met}, trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        best_score = getattr(checkpoint, "best_model_score", None)
        cpu = os.times()
        self.info["final"] = {
            # cost of the run: wall time since setup, and this process's CPU time (all threads)
            "wall_s": round(time.monotonic() - self._setup_at, 1),
            "cpu_s": round(cpu.user + cpu.system, 1),
            "unreadable_images_met": getattr(trainer.datamodule, "num_unreadable_met", 0),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            "best_model_path": getattr(checkpoint, "best_model_path", None) or None,
            "best_model_score": None if best_score is None else float(best_score),
        }
        self._write(trainer)

    on_test_end = on_fit_end

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        config = redact_secrets(self.config) if self.config is not None else None
        path = run_file_dir(trainer) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.info, "config": config}, indent=2, default=str) + "\n")


class AttentionMaps(Callback):
    """Draws where each stage's last attention layer looks, for a few fixed validation images.

    Each row is an image; each column the attention a stage's last layer *receives* per key
    region (averaged over heads and queries), upsampled and laid over the image. Written as
    ``<log_dir>/attention/epoch_NNN.png`` and sent to W&B (and TensorBoard) when they log.
    Models without ``forward_with_aux`` (timm baselines) are skipped.

    Args:
        num_images: validation images to draw (the first of the first batch); 0 disables.
        every_n_epochs: draw every this many epochs.
    """

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = max(1, every_n_epochs)
        self._images: torch.Tensor | None = None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._images is None and self.num_images > 0 and batch_idx == 0 and dataloader_idx == 0:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._images = x[: self.num_images].detach().cpu()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "eval_model", getattr(pl_module, "model", pl_module))
        if (
            self._images is None
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or trainer.current_epoch % self.every_n_epochs
            or not hasattr(model, "forward_with_aux")
        ):
            return
        with torch.no_grad():
            out = model.forward_with_aux(
                self._images.to(pl_module.device), dp_loss=False, collect_attn=True
            )
        last_per_stage = {record.stage: record for record in out.attentions}  # later wins
        records = [last_per_stage[s] for s in sorted(last_per_stage)]
        figure = self._draw(self._images, records)
        path = run_file_dir(trainer) / "attention" / f"epoch_{trainer.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/attention", [image], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "val/attention", image, trainer.global_step, dataformats="HWC"
                )

    @staticmethod
    def _draw(images: torch.Tensor, records: list) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global backend state

        n, cols = images.shape[0], 1 + len(records)
        figure = Figure(figsize=(1.8 * cols, 1.8 * n), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(n, cols, squeeze=False)
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        hi = images.amax(dim=(1, 2, 3), keepdim=True)
        shown = ((images - lo) / (hi - lo).clamp_min(1e-6)).permute(0, 2, 3, 1).numpy()
        size = images.shape[-2:]
        for col, record in enumerate(records, start=1):
            received = record.probs.float().mean(dim=(1, 2))  # (B, N'): mean over heads, queries
            heat = received.reshape(-1, 1, *record.key_grid).cpu()
            heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[:, 0]
            for row in range(n):
                axes[row, col].imshow(shown[row])
                axes[row, col].imshow(heat[row].numpy(), cmap="inferno", alpha=0.55)
            axes[0, col].set_title(
                f"stage {record.stage + 1} · L{record.layer + 1} {record.kind.upper()}", fontsize=8
            )
        for row in range(n):
            axes[row, 0].imshow(shown[row])
        axes[0, 0].set_title("input", fontsize=8)
        for ax in axes.flat:
            ax.set_axis_off()
        figure.canvas.draw()
        return figure
