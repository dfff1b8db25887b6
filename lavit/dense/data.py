"""Dense-task data: COCO-format detection and image/mask segmentation, with paired transforms.

Images, boxes and masks go through torchvision ``transforms.v2`` as ``tv_tensors`` together, so
a flip, resize or crop moves them alike; images come out as float tensors in [0, 1] (the task
modules normalise and pad them). Detection batches are ``(images, targets)`` lists, targets with
``boxes`` (xyxy pixels of the resized image), ``labels``, ``iscrowd``, ``image_id``,
``orig_size`` and ``size``; segmentation evaluation keeps the original mask, so mIoU is measured
at the annotation's resolution. ``source: demo`` is built from the embedded CIFAR-10 images.
Both tasks' data modules live here, over 400 lines, because they share the source options,
the paired transforms and the batch padding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lavit.dense.demo import DEMO_CLASSES, build_dense_demo, dense_demo_dir
from lavit.dense.sources import (
    BBoxFormat,
    DenseSourceType,
    DetectionSplit,
    SegmentationSplit,
    check_boxes,
    decode_image,
    decode_mask,
    guess_dense_source_type,
    load_hf_split,
    read_coco_split,
    read_hf_detection,
    read_hf_segmentation,
    read_mask_folder_split,
)
from lavit.training.options import (
    AtLeastTwoInt,
    NonNegativeInt,
    PositiveInt,
    Probability,
    check_arguments,
)

IGNORE_INDEX = 255


def collate_lists(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """``[(image, target), ...]`` → ``([images], [targets])`` (sizes may differ)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class FitCanvas(v2.Transform):
    """Keep-ratio resize of every input alike to fit inside ``canvas`` (H, W)."""

    # torchvision's Resize bounds the short and the long side, not a height and a width.
    def __init__(self, canvas: tuple[int, int]) -> None:
        super().__init__()
        self.canvas = canvas

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)).shape[-2:]
        factor = min(self.canvas[0] / height, self.canvas[1] / width)
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, size=params["size"], antialias=True)


def keep_ratio_resize(scale: tuple[int, int] | None, canvas: tuple[int, int] | None):
    """Fit ``canvas`` (H, W), else mmdetection's ``scale`` (long, short): the short side to
    ``short`` unless the long side would pass ``long`` (torchvision's ``max_size``)."""
    if canvas is not None:
        return FitCanvas(tuple(canvas))
    if scale is not None:
        return v2.Resize(min(scale), max_size=max(scale), antialias=True)
    return v2.Identity()


def _check_multiple_of_32(name: str, size: tuple[int, int]) -> None:
    if any(side % 32 or side <= 0 for side in size):
        raise ValueError(
            f"{name} {list(size)} must be positive multiples of 32 (the backbone's stride), "
            f"e.g. {[max(32, round(s / 32) * 32) for s in size]}"
        )


def _to_image(pil) -> tv_tensors.Image:
    return TF.to_dtype(TF.to_image(pil), torch.float32, scale=True)


@dataclass(eq=False)
class DetectionDataset(Dataset):
    """Decodes image ``i``, checks its boxes against its real size, applies ``transform``."""

    split: DetectionSplit
    transform: v2.Transform
    drop_crowd: bool  # training ignores crowd regions, as mmdetection does

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        record = self.split.records[i]
        pil = decode_image(record["image"], record["size"])
        height, width = pil.height, pil.width
        boxes, labels, crowd = record["boxes"], record["labels"], record["iscrowd"]
        if record["size"] is None:  # no annotated size: check the boxes against the real one
            boxes = check_boxes(boxes, (height, width), str(record["image"]), "xyxy")
        if self.drop_crowd:
            keep = crowd == 0
            boxes, labels, crowd = boxes[keep], labels[keep], crowd[keep]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.as_tensor(boxes).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.as_tensor(labels),
            "iscrowd": torch.as_tensor(crowd),
        }
        image, target = self.transform(_to_image(pil), target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        target["image_id"] = record["image_id"]
        target["orig_size"] = (height, width)
        target["size"] = tuple(image.shape[-2:])
        return image.as_subclass(torch.Tensor), target


@dataclass(eq=False)
class SegmentationDataset(Dataset):
    """Decodes image and mask ``i``; training transforms both, evaluation the image only."""

    split: SegmentationSplit
    transform: v2.Transform
    train: bool
    num_classes: int
    reduce_zero_label: bool  # ADE20K: 0 is "other", not a class
    ignore_index: int = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.split)

    def _labels(self, mask: np.ndarray, i: int) -> np.ndarray:
        if self.reduce_zero_label:
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = sorted(np.unique(mask[bad]).tolist())[:5]
            raise ValueError(
                f"{self.split[i][1]}: label values {values} are outside 0.."
                f"{self.num_classes - 1} and not the ignore index {self.ignore_index}; set "
                "data.num_classes (and data.reduce_zero_label for ADE20K-style masks)"
            )
        return mask

    def __getitem__(self, i: int):
        image_ref, mask_ref = self.split[i]
        pil = decode_image(image_ref)
        mask = self._labels(decode_mask(mask_ref, (pil.height, pil.width)), i)
        image = _to_image(pil)
        mask = tv_tensors.Mask(torch.as_tensor(mask, dtype=torch.int64))
        if self.train:
            image, mask = self.transform(image, mask)
        else:
            image = self.transform(image)  # the mask stays at its own resolution
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


class DenseDataModule(L.LightningDataModule):
    """Shared options (the subclasses' arguments of these names): the source, the splits and
    the loaders."""

    train_collate = staticmethod(collate_lists)
    SHARED = ("source", "source_type", "train_split", "val_split", "test_split", "hub_config")
    SHARED += ("cache_dir", "image_column", "batch_size", "val_batch_size", "num_workers")
    SHARED += ("pin_memory",)

    def __init__(self, arguments: dict[str, Any]) -> None:
        super().__init__()
        check_arguments(type(self).__init__, arguments)
        for name in self.SHARED:
            setattr(self, name, arguments[name])
        if self.source_type == "auto":
            self.source_type = guess_dense_source_type(self.source)
        if self.pin_memory is None:
            self.pin_memory = torch.cuda.is_available()
        self._splits: dict[str, Any] = {}
        self.datasets: dict[str, Dataset] = {}

    @property
    def root(self) -> str:
        """The folder or id read: for ``demo``, the demo set (built on first use)."""
        if self.source_type == "demo":
            return str(build_dense_demo(dense_demo_dir(self.cache_dir)))
        return os.path.expanduser(self.source)

    def _split_names(self) -> list[str]:
        return list(
            dict.fromkeys(filter(None, (self.train_split, self.val_split, self.test_split)))
        )

    def _hf(self, split: str):
        return load_hf_split(self.root, split, self.source_type, self.hub_config, self.cache_dir)

    def _split(self, name: str):
        if name not in self._splits:
            self._splits[name] = self._read_split(name)
        return self._splits[name]

    def prepare_data(self) -> None:
        # Reads and checks every split's annotations: a bad file stops the run here.
        for name in self._split_names():
            self._split(name)

    def setup(self, stage: str | None = None) -> None:
        for name in self._split_names():
            if name not in self.datasets:
                self.datasets[name] = self._dataset(self._split(name), name == self.train_split)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split or self.val_split, False)

    def _loader(self, name: str, train: bool) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size if train else self.val_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.train_collate if train else collate_lists,
        )


class DetectionDataModule(DenseDataModule):
    """COCO-format detection data.

    Args:
        source: ``demo`` (offline CIFAR-10 demo set), a COCO folder (``annotations/instances_
            <split>.json`` + ``<split>/`` images), a Hub id with an ``objects`` column
            (``detection-datasets/coco``), a folder/glob of such parquet files, or a
            ``save_to_disk`` folder.
        source_type: how to read ``source``; ``auto`` guesses from it.
        train_split, val_split, test_split: split names (COCO 2017: ``train2017``, ``val2017``).
        bbox_format: ``xywh`` (COCO's [x, y, w, h]) or ``xyxy`` corners.
        scale: keep-ratio resize (long, short) as mmdetection's ``(1333, 800)``.
        canvas: instead, fit every image inside a fixed (H, W) (for backbones built for one
            input size; the model pads batches to it); ``None``: batches padded to a multiple
            of 32 (needs a backbone that takes any size).
        hflip: horizontal-flip probability in training.
        num_classes: override the number of classes (default: the annotation's categories).
        image_column, objects_column: Hugging Face column names.
        hub_config, cache_dir: Hub dataset configuration and cache folder (also where the demo
            set is built).
        batch_size, val_batch_size, num_workers, pin_memory: DataLoader settings (per device).
    """

    def __init__(
        self,
        source: str = "demo",
        source_type: DenseSourceType = "auto",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        bbox_format: BBoxFormat = "xywh",
        scale: tuple[int, int] | None = (1333, 800),
        canvas: tuple[int, int] | None = None,
        hflip: Probability = 0.5,
        num_classes: PositiveInt | None = None,
        image_column: str = "image",
        objects_column: str = "objects",
        hub_config: str | None = None,
        cache_dir: str | None = None,
        batch_size: PositiveInt = 2,
        val_batch_size: PositiveInt = 2,
        num_workers: NonNegativeInt = 2,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(locals())
        if canvas is not None:
            _check_multiple_of_32("canvas", canvas)
        self.bbox_format = bbox_format
        self.scale, self.canvas = scale, (tuple(canvas) if canvas else None)
        self.hflip = hflip
        self._num_classes = num_classes
        self.objects_column = objects_column
        resize = keep_ratio_resize(scale, self.canvas)
        sanitize = v2.SanitizeBoundingBoxes(
            min_size=1.0, labels_getter=lambda inputs: (inputs[1]["labels"], inputs[1]["iscrowd"])
        )
        self.train_transform = v2.Compose([v2.RandomHorizontalFlip(hflip), resize, sanitize])
        self.eval_transform = v2.Compose([resize, v2.ClampBoundingBoxes()])

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The fixed (H, W) the model must pad to, or ``None`` (any multiple of 32)."""
        return self.canvas

    @property
    def class_names(self) -> list[str]:
        return self._split(self.train_split).class_names

    @property
    def num_classes(self) -> int:
        return self._num_classes or len(self.class_names)

    def _read_split(self, name: str) -> DetectionSplit:
        if self.source_type in ("coco", "demo"):
            split = read_coco_split(self.root, name, self.bbox_format)
        else:
            split = read_hf_detection(
                self._hf(name), name, self.bbox_format, self.image_column, self.objects_column
            )
        top = max((int(r["labels"].max()) for r in split.records if len(r["labels"])), default=-1)
        if self._num_classes is not None and top >= self._num_classes:
            raise ValueError(
                f"split {name!r} has category {top} but num_classes={self._num_classes}; "
                "raise data.num_classes or leave it unset (the categories decide)"
            )
        split.class_names = split.class_names or [str(k) for k in range(top + 1)]
        return split

    def _dataset(self, split: DetectionSplit, train: bool) -> Dataset:
        transform = self.train_transform if train else self.eval_transform
        return DetectionDataset(split, transform, drop_crowd=train)


class SegmentationDataModule(DenseDataModule):
    """Semantic segmentation data: image + mask pairs.

    Args:
        source: ``demo``, ADE20K-style folders (``images/<split>/`` + ``annotations/<split>/``),
            a Hub id with image and mask columns (``scene_parse_150``), parquet files, or a
            ``save_to_disk`` folder.
        num_classes: classes (150 for ADE20K); ``None``: 3 for the demo (background + 2).
        reduce_zero_label: label 0 means "other" (ignored) and k means class k−1 (ADE20K).
        ignore_index: label value not scored nor trained on (also the crop padding).
        scale: the short side images are resized around (evaluation: exactly).
        ratio_range: training resizes the short side to ``scale × U(ratio_range)``.
        crop_size: training crop (H, W), padded with ``ignore_index`` where the image is smaller.
        hflip: horizontal-flip probability in training.
        mask_column: Hugging Face column of the masks.
    """

    train_collate = staticmethod(default_collate)  # crops of one size: a tensor

    def __init__(
        self,
        source: str = "demo",
        source_type: DenseSourceType = "auto",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        num_classes: AtLeastTwoInt | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = IGNORE_INDEX,
        scale: PositiveInt = 512,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        crop_size: tuple[int, int] = (512, 512),
        hflip: Probability = 0.5,
        image_column: str = "image",
        mask_column: str = "annotation",
        hub_config: str | None = None,
        cache_dir: str | None = None,
        batch_size: PositiveInt = 4,
        val_batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 2,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(locals())
        if num_classes is None and self.source_type != "demo":
            raise ValueError("num_classes must be given for this source (150 for ADE20K)")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(
                f"ratio_range must be [low, high] with 0 < low <= high, got {list(ratio_range)}"
            )
        _check_multiple_of_32("crop_size", crop_size)
        self._num_classes = num_classes or len(DEMO_CLASSES) + 1
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.crop_size = tuple(crop_size)
        self.mask_column = mask_column
        low, high = (max(1, math.floor(scale * r)) for r in ratio_range)
        self.train_transform = v2.Compose(
            [
                v2.RandomResize(low, high + 1, antialias=True),
                v2.RandomCrop(
                    list(crop_size),
                    pad_if_needed=True,
                    fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index},
                ),
                v2.RandomHorizontalFlip(hflip),
            ]
        )
        self.eval_transform = v2.Resize(scale, antialias=True)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        if self.source_type == "demo":
            return ["background", *DEMO_CLASSES]
        return [str(k) for k in range(self.num_classes)]

    @property
    def input_size(self) -> tuple[int, int]:
        """The training crop: the size a fixed-size backbone is built for."""
        return self.crop_size

    def _read_split(self, name: str) -> SegmentationSplit:
        if self.source_type in ("folders", "demo"):
            return read_mask_folder_split(self.root, name)
        return read_hf_segmentation(self._hf(name), name, self.image_column, self.mask_column)

    def _dataset(self, split: SegmentationSplit, train: bool) -> Dataset:
        transform = self.train_transform if train else self.eval_transform
        return SegmentationDataset(
            split, transform, train, self.num_classes, self.reduce_zero_label, self.ignore_index
        )
