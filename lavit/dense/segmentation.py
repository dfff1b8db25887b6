"""Semantic FPN on a LaViT (or any timm pyramid) backbone: segmentation-models-pytorch's head.

smp's FPN decoder and segmentation head (Kirillov et al.'s Semantic FPN, with GroupNorm where
mmsegmentation has SyncBN) on our :class:`~lavit.dense.backbone.DenseBackbone`: smp's own
``tu-<timm name>`` encoder renames each timm model's weights its own way, where one backbone class
for both tasks keeps one checkpoint loader. mIoU through torchmetrics' ``MulticlassJaccardIndex``
(mmsegmentation's dataset-level mIoU) at the masks' original resolution; logged ``val/mIoU`` and
``val/aAcc`` (pixel accuracy).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lavit.dense.task import DenseTaskModule, LRSchedule
from lavit.training.options import (
    AtLeastTwoInt,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    UnitIntervalLeftOpen,
    check_arguments,
)

__all__ = ["SemanticFPNModule", "sliding_windows"]

Inference = Literal["whole", "slide"]


def sliding_windows(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, size)`` (the last one flush with the end)."""
    return [*range(0, size - window, stride), size - window] if size > window else [0]


def _metrics(num_classes: int, ignore_index: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "aAcc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        },
        prefix=prefix,
        compute_groups=False,
    )


class SemanticFPNModule(DenseTaskModule):
    """Semantic FPN with a timm backbone, trained with the PVT/mmsegmentation ADE20K recipe.

    Args:
        num_classes: classes (linked from the data by the CLI).
        ignore_index: label value neither trained on nor scored.
        backbone, backbone_checkpoint, backbone_kwargs, drop_path_rate: as for RetinaNet.
        img_size: the (H, W) the backbone is built for (linked from ``data.crop_size``).
        pyramid_channels: FPN width (256).
        segmentation_channels: per-level head width (128; a multiple of 32 for GroupNorm).
        dropout: spatial dropout before the classifier (0.1 as mmsegmentation's FPN head).
        inference: ``slide``: windows of ``img_size`` with ``slide_stride`` (any backbone, any
            image size); ``whole``: the whole image, padded to a multiple of 32 (needs a
            backbone that takes any size).
        slide_stride: window stride (H, W); ``None``: 2/3 of the window (341 for 512).
        image_mean, image_std: input normalisation.
        lr, weight_decay, betas, lr_schedule, ...: AdamW and the LR schedule; ``poly`` by default.
    """

    MONITOR = "val/mIoU"  # the CLI's best-checkpoint metric

    def __init__(
        self,
        num_classes: AtLeastTwoInt = 150,
        ignore_index: int = 255,
        backbone: str = "lavit_small",
        backbone_checkpoint: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        img_size: tuple[int, int] | None = None,
        drop_path_rate: float = 0.1,
        pyramid_channels: int = 256,
        segmentation_channels: int = 128,
        dropout: float = 0.1,
        inference: Inference = "slide",
        slide_stride: tuple[int, int] | None = None,
        image_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        image_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        lr: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: LRSchedule = "poly",
        warmup_iters: NonNegativeInt = 0,
        warmup_ratio: UnitIntervalLeftOpen = 1e-6,
        lr_milestones: tuple[int, ...] = (),
        lr_gamma: float = 0.1,
        poly_power: float = 0.9,
        min_lr: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_arguments(SemanticFPNModule.__init__, locals())
        if segmentation_channels % 32:
            raise ValueError(
                f"segmentation_channels must be a multiple of 32 (GroupNorm of 32 groups), got "
                f"{segmentation_channels}"
            )
        if inference == "slide" and img_size is None:
            raise ValueError("inference='slide' needs img_size (the window), e.g. [512, 512]")
        self.backbone = self._build_backbone((4, 8, 16, 32))
        self.decoder = FPNDecoder(
            encoder_channels=self.backbone.out_channels,
            encoder_depth=3,  # the 4 maps given are C2–C5
            pyramid_channels=pyramid_channels,
            segmentation_channels=segmentation_channels,
            dropout=dropout,
            merge_policy="add",
        )
        self.head = SegmentationHead(
            self.decoder.out_channels, num_classes, kernel_size=1, upsampling=4
        )
        self.val_metrics = _metrics(num_classes, ignore_index, "val/")
        self.test_metrics = _metrics(num_classes, ignore_index, "test/")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 32 → logits (B, K, H, W)."""
        images = TF.normalize(images, list(self.hparams.image_mean), list(self.hparams.image_std))
        features = list(self.backbone(images).values())
        return self.head(self.decoder(features))

    def training_step(self, batch, batch_idx: int):
        images, masks = batch
        logits = self(images)
        loss = F.cross_entropy(logits, masks, ignore_index=self.hparams.ignore_index)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.size(0))
        return loss

    # ------------------------------------------------------------------------------ inference
    def _whole(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        pad_h, pad_w = (-h) % 32, (-w) % 32
        logits = self(F.pad(image[None], (0, pad_w, 0, pad_h)))
        return logits[0, :, :h, :w]

    def _slide(self, image: torch.Tensor) -> torch.Tensor:
        (wh, ww), (h, w) = self.hparams.img_size, image.shape[-2:]
        sh, sw = self.hparams.slide_stride or (max(1, wh * 2 // 3), max(1, ww * 2 // 3))
        image = F.pad(image, (0, max(0, ww - w), 0, max(0, wh - h)))  # at least one window
        height, width = image.shape[-2:]
        starts = [
            (y, x) for y in sliding_windows(height, wh, sh) for x in sliding_windows(width, ww, sw)
        ]
        windows = self(torch.stack([image[:, y : y + wh, x : x + ww] for y, x in starts]))
        logits = image.new_zeros(self.hparams.num_classes, height, width)
        count = image.new_zeros(1, height, width)
        for (y, x), out in zip(starts, windows, strict=True):
            logits[:, y : y + wh, x : x + ww] += out
            count[:, y : y + wh, x : x + ww] += 1
        return (logits / count)[:, :h, :w]

    def predict_logits(self, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Logits (K, *out_size) for one image (3, h, w) in [0, 1]."""
        logits = self._slide(image) if self.hparams.inference == "slide" else self._whole(image)
        return F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]

    def _evaluate(self, batch, metrics: MetricCollection) -> None:
        images, masks = batch
        for image, mask in zip(images, masks, strict=True):
            prediction = self.predict_logits(image, tuple(mask.shape[-2:])).argmax(0)
            metrics.update(prediction[None], mask[None])
        self.log_dict(metrics, prog_bar=True, batch_size=len(images))

    def predict_step(self, batch, batch_idx: int) -> list[torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return [self.predict_logits(im, tuple(im.shape[-2:])).argmax(0) for im in images]
