"""RetinaNet on a LaViT (or any timm pyramid) backbone, from torchvision's detection parts.

The detector is torchvision's ``RetinaNet`` with its own anchor generator, head, focal and box
losses, matcher, box coder and post-processing; only the backbone and the input batching are
ours. The neck is torchvision's ``FeaturePyramidNetwork`` on C3–C5 (strides 8/16/32) with P6/P7
from C5 (``LastLevelP6P7``), i.e. mmdetection's RetinaNet neck (``add_extra_convs='on_input'``).

COCO mAP through torchmetrics' ``MeanAveragePrecision`` (the COCO evaluation itself), on boxes
mapped back to each image's original size so that the small/medium/large areas are COCO's.
Logged per validation: ``val/AP``, ``val/AP50``, ``val/AP75``, ``val/APs``, ``val/APm``,
``val/APl`` (−1 where a size range has no object, as COCO reports it).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from lavit.dense.backbone import DenseBackbone
from lavit.dense.task import DenseTaskModule, LRSchedule
from lavit.training.options import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitIntervalLeftOpen,
    check_arguments,
)

__all__ = ["AP_KEYS", "BackboneWithFPN", "BatchOnlyTransform", "RetinaNetModule"]

# torchmetrics' result key → logged name
AP_KEYS = {"map": "AP", "map_50": "AP50", "map_75": "AP75"}
AP_KEYS |= {"map_small": "APs", "map_medium": "APm", "map_large": "APl"}


class BackboneWithFPN(nn.Module):
    """C3–C5 of a :class:`DenseBackbone` → FPN P3–P7 (``out_channels`` each)."""

    def __init__(self, body: DenseBackbone, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.out_channels,
            out_channels,
            extra_blocks=LastLevelP6P7(body.out_channels[-1], out_channels),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))  # "0".."2" (P3–P5), "p6", "p7"


class BatchOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize (the data module resized).

    Normalises, then pads the batch to ``fixed_canvas`` (H, W) when given (backbones built for
    one input size), else to a multiple of 32.
    """

    def __init__(self, image_mean, image_std, fixed_canvas: tuple[int, int] | None) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=image_mean, image_std=image_std)
        self.fixed_canvas = tuple(fixed_canvas) if fixed_canvas else None

    def resize(self, image, target=None):
        return image, target

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        if self.fixed_canvas is None:
            return super().batch_images(images, size_divisible)
        height, width = self.fixed_canvas
        for image in images:
            if image.shape[-2] > height or image.shape[-1] > width:
                raise ValueError(
                    f"an image of {image.shape[-1]}×{image.shape[-2]} does not fit the model's "
                    f"fixed {width}×{height} input: resize the data to fit it (data.canvas)"
                )
        pads = [(0, width - im.shape[-1], 0, height - im.shape[-2]) for im in images]
        return torch.stack([F.pad(im, pad) for im, pad in zip(images, pads, strict=True)])


class RetinaNetModule(DenseTaskModule):
    """RetinaNet (torchvision) with a timm backbone, trained with the mmdetection 1× recipe.

    Args:
        num_classes: object classes, without background (linked from the data by the CLI).
        backbone: timm arch of the backbone (``lavit_tiny``, ``lavit_small``, ``pvt_v2_b1``).
        backbone_checkpoint: a classification checkpoint of that arch (Lightning ``.ckpt`` of
            ``LaViTModule``, EMA weights preferred, or a plain state dict), at any input size:
            LaViT's position embeddings and Ψ/Θ are converted to the backbone's size.
        backbone_kwargs: more backbone arguments (``la_mixing``, ``num_va_layers``, ...).
        img_size: the fixed (H, W) input the backbone is built for and batches are padded to
            (linked from ``data.canvas`` by the CLI); ``None``: any multiple of 32.
        drop_path_rate: stochastic depth of the backbone.
        fpn_channels: FPN and head width (256 in the paper's detector).
        anchor_sizes: anchor base size per level P3–P7; each level has 3 scales (×2^(k/3)).
        anchor_ratios: anchor aspect ratios.
        head_norm: GroupNorm in the head's convs (torchvision's v2 head); off as in RetinaNet.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing.
        lr, weight_decay, betas: AdamW (no decay on norms, biases, position embeddings, Ψ/Θ).
        lr_schedule, warmup_iters, warmup_ratio, lr_milestones, lr_gamma, poly_power, min_lr:
            the LR schedule (see :mod:`lavit.dense.task`); milestones are epochs.
    """

    MONITOR = "val/AP"  # the CLI's best-checkpoint metric

    def __init__(
        self,
        num_classes: PositiveInt = 80,
        backbone: str = "lavit_tiny",
        backbone_checkpoint: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        img_size: tuple[int, int] | None = None,
        drop_path_rate: float = 0.1,
        fpn_channels: int = 256,
        anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        head_norm: bool = False,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        image_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        image_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        lr: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: LRSchedule = "step",
        warmup_iters: NonNegativeInt = 500,
        warmup_ratio: UnitIntervalLeftOpen = 0.001,
        lr_milestones: tuple[int, ...] = (8, 11),
        lr_gamma: float = 0.1,
        poly_power: float = 0.9,
        min_lr: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_arguments(RetinaNetModule.__init__, locals())
        if len(anchor_sizes) != 5:
            raise ValueError(
                f"anchor_sizes needs one size per level P3–P7 (5), got {list(anchor_sizes)}"
            )
        body = self._build_backbone((8, 16, 32))
        anchors = AnchorGenerator(
            tuple(tuple(round(s * 2 ** (k / 3)) for k in range(3)) for s in anchor_sizes),
            (tuple(anchor_ratios),) * len(anchor_sizes),
        )
        head = RetinaNetHead(
            fpn_channels,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=partial(nn.GroupNorm, 32) if head_norm else None,
        )
        self.detector = RetinaNet(
            BackboneWithFPN(body, fpn_channels),
            num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        self.detector.transform = BatchOnlyTransform(image_mean, image_std, img_size)
        # Built on the CPU even when the module is built on the meta device (MAC counting):
        # the metric reads its IoU thresholds out of a tensor; it holds no weights.
        with torch.device("cpu"):
            self.val_metrics = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
            self.test_metrics = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")

    @property
    def backbone(self) -> DenseBackbone:
        return self.detector.backbone.body

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``boxes`` (xyxy, input pixels), ``scores``, ``labels``."""
        return self.detector(images)

    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        losses = self.detector(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/cls", losses["classification"], batch_size=size)
        self.log("train/box", losses["bbox_regression"], batch_size=size)
        return loss

    def _evaluate(self, batch, metric: MeanAveragePrecision) -> None:
        images, targets = batch
        detections = self.detector(images)
        # boxes back at each image's original size, so that COCO's small/medium/large hold
        preds = [
            {**d, "boxes": resize_boxes(d["boxes"], t["size"], t["orig_size"])}
            for d, t in zip(detections, targets, strict=True)
        ]
        truth = [
            {**t, "boxes": resize_boxes(t["boxes"], t["size"], t["orig_size"])} for t in targets
        ]
        metric.update(preds, truth)

    def _log_map(self, metric: MeanAveragePrecision, split: str) -> None:
        result = metric.compute()
        # torchmetrics already gathered every rank's detections: no sync_dist
        for key, name in AP_KEYS.items():
            self.log(f"{split}/{name}", result[key].float(), prog_bar=name == "AP")
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.detector(images)
