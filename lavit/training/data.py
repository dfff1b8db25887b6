"""The LightningDataModule: images from one of four sources (:mod:`lavit.training.sources`),
decoded in the DataLoader workers with timm's transforms, or held in memory and augmented on
batches (:mod:`lavit.training.batch_transforms`). Mixup/CutMix happen in the module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import Compose

from lavit.errors import DataError, OptionError
from lavit.training.batch_transforms import BatchAugment, InMemoryImages, NotInMemory
from lavit.training.images import DecodedImages, make_posterize_safe, unlabelled_folder
from lavit.training.options import (
    AspectRatioRange,
    AutoAugmentPolicy,
    CropScale,
    Folder,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    Probability,
    UnitIntervalLeftOpen,
    check_arguments,
)
from lavit.training.resumable import ResumableShuffle, mid_epoch
from lavit.training.sources import (
    EMBEDDED_SOURCE,
    VALIDATION_SPLIT_NAMES,
    ImageSource,
    SourceType,
    guess_source_type,
    local_copy,
)

Interpolation = Literal["bicubic", "bilinear", "nearest"]
# The training recipe: arguments of timm's create_transform, and of BatchAugment, by name.
RECIPE = ("scale", "ratio", "hflip", "vflip", "interpolation", "color_jitter", "auto_augment")
RECIPE += ("re_prob", "re_mode", "re_count")


class ImageDataModule(L.LightningDataModule):
    """Image classification data from the Hub, an image folder, parquet files or the embedded set.

    Args:
        source: ``embedded`` (a shipped 4,000/1,000-image CIFAR-10 subset), a Hub dataset id
            (``owner/name``), an image folder (``root/class/*.jpg``, optionally under split
            folders ``root/train``, ``root/val``, ``root/test``) or parquet files (a file, glob
            or folder; files named after splits, like ``train.parquet``, become those splits).
        source_type: how to read ``source``; ``auto`` guesses from the string.
        hub_config: the configuration name of a Hub dataset that has several.
        image_column, label_column: default: the first ``Image`` / ``ClassLabel`` feature, else
            a column named ``image``/``img`` / ``label``/``labels``.
        train_split, val_split, test_split: split names; validation default: a split named
            ``validation``, ``val`` or ``valid``, else ``val_fraction`` of the training split,
            stratified by class, drawn with ``seed``; test (and predict) default: ``test`` if
            labelled, else validation.
        val_fraction, seed: the held-out validation fraction and its seed.
        img_size, mean, std, crop_pct, interpolation, scale, ratio, hflip, vflip, color_jitter,
            auto_augment, re_prob, re_mode, re_count: timm's ``create_transform`` arguments.
        batch_size, num_workers, pin_memory: per device; default ``min(4, CPUs)`` workers,
            pinned memory when CUDA is available.
        bad_images: image-folder files that do not decode, found by a check of every file
            before training (cached by path, size and modification time): ``error`` lists them
            and stops, ``skip`` leaves them out with a warning; ``lazy`` skips the check and
            replaces an unreadable image met in training by the next one, counted.
        cache_dir: Hugging Face ``datasets`` cache folder; default: the library's.
        in_memory: hold the training and validation images decoded in one uint8 tensor and
            augment batches on the device, for small images such as CIFAR's. ``auto``: each
            split whose images share one size and fit the memory budget, under no policy but
            RandAugment (one log line says which); ``true``: an error where one cannot be held.
        predict_source: a folder of images (any layout) for ``lavit predict``; default: test.

    ``num_classes`` and ``class_names`` can be read before ``setup``; ``num_skipped_images``
    counts the files left out by ``bad_images="skip"``.
    """

    def __init__(
        self,
        source: str = EMBEDDED_SOURCE,
        source_type: SourceType = "auto",
        hub_config: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        val_fraction: OpenUnitInterval = 0.1,
        seed: int = 0,
        img_size: PositiveInt = 224,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_DEFAULT_STD,
        crop_pct: UnitIntervalLeftOpen = 0.875,
        interpolation: Interpolation = "bicubic",
        scale: CropScale = (0.08, 1.0),
        ratio: AspectRatioRange = (3 / 4, 4 / 3),
        hflip: Probability = 0.5,
        vflip: Probability = 0.0,
        color_jitter: NonNegativeFloat | None = 0.4,
        auto_augment: AutoAugmentPolicy | None = "rand-m9-mstd0.5-inc1",
        re_prob: Probability = 0.25,
        re_mode: Literal["const", "rand", "pixel"] = "pixel",
        re_count: PositiveInt = 1,
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt | None = None,
        pin_memory: bool | None = None,
        bad_images: Literal["error", "skip", "lazy"] = "error",
        cache_dir: Folder | None = None,
        in_memory: bool | Literal["auto"] = "auto",
        predict_source: str | None = None,
    ) -> None:
        super().__init__()
        arguments = locals()
        check_arguments(ImageDataModule.__init__, arguments)
        self.save_hyperparameters()
        named_type = guess_source_type(source) if source_type == "auto" else source_type
        if hub_config is not None and named_type != "hub":
            allowed = f"a configuration name of a Hub dataset; {named_type!r} has none"
            raise OptionError("hub_config", hub_config, allowed)
        copy = local_copy(source) if named_type == "hub" else None  # this machine's copy
        self.source = copy or source
        self.source_type = guess_source_type(copy) if copy else named_type
        self.image_source = ImageSource(
            self.source, self.source_type, hub_config, image_column, label_column, train_split,
            bad_images, cache_dir,
        )  # fmt: skip
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        if predict_source is not None and not Path(predict_source).expanduser().is_dir():
            raise OptionError("predict_source", predict_source, "must be a folder of images")
        self.predict_source = predict_source
        # Built here so that a bad augmentation setting fails when the config is read.
        recipe = {name: arguments[name] for name in RECIPE}
        self.train_transform = create_transform(img_size, True, mean=mean, std=std, **recipe)
        make_posterize_safe(self.train_transform)
        self.in_memory = in_memory
        if in_memory and auto_augment and not auto_augment.startswith("rand"):
            problem = f"auto_augment={auto_augment!r} has no batch version (only 'rand-*')"
            if in_memory is True:
                raise OptionError("auto_augment", auto_augment, f"{problem}: set in_memory=auto")
            rank_zero_info(f"Data: read per image: {problem}")
            self.in_memory = False
        self.batch_augment = BatchAugment(img_size, mean, std, **recipe) if self.in_memory else None
        self.eval_transform = create_transform(
            img_size, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct
        )
        self.lazy, self.num_skipped_images = bad_images == "lazy", 0
        self._train_loader: StatefulDataLoader | None = None
        self._train_loader_state: dict[str, Any] | None = None
        self.train_dataset: DecodedImages | None = None
        self.val_dataset: DecodedImages | None = None
        self.test_dataset: DecodedImages | None = None
        self._splits: datasets.DatasetDict | None = None
        self._class_names: list[str] | None = None

    # ----------------------------------------------------------------------------- classes
    @property
    def class_names(self) -> list[str]:
        """Class names in label order; read from metadata alone where the source allows it."""
        if self._class_names is None:
            self._class_names = self.image_source.class_names()
        if self._class_names is None:
            self._load_splits()  # which reads them
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_unreadable_met(self) -> int:
        """Unreadable images met and replaced so far (``bad_images="lazy"``; all splits)."""
        splits = (self.train_dataset, self.val_dataset, self.test_dataset)
        return sum(getattr(dataset, "unreadable_met", 0) for dataset in splits)

    # ------------------------------------------------------------------------------ Lightning
    def prepare_data(self) -> None:
        # Downloads (Hub) or converts to Arrow (parquet) once per node; setup reuses the cache.
        self._load_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        splits = self._load_splits()
        train_rows = splits[self.train_split]
        val_name = self.val_split or next((n for n in VALIDATION_SPLIT_NAMES if n in splits), None)
        if val_name is not None:
            val_rows = splits[val_name]
        else:  # carved out of the training split
            val_name = self.train_split
            rows = train_rows.add_column("row", np.arange(len(train_rows)))  # names each image
            held_out = round(self.val_fraction * len(rows))  # datasets would round up
            if held_out == 0:
                raise ValueError(
                    f"val_fraction={self.val_fraction} of the {len(rows)} training images holds "
                    "out none; raise it or set val_split"
                )
            try:
                parts = rows.train_test_split(held_out, stratify_by_column="label", seed=self.seed)
            except ValueError as why:  # too few images, of a class or in all, to stratify
                rank_zero_info(f"Data: validation images drawn without stratification ({why})")
                parts = rows.train_test_split(held_out, seed=self.seed)
            train_rows, val_rows = parts["train"], parts["test"]
        self.train_dataset = self._fit_dataset(train_rows, self.train_split, train=True)
        self.val_dataset = self._fit_dataset(val_rows, val_name, train=False)
        test_name = self.test_split or ("test" if _is_labelled(splits.get("test")) else None)
        # Test and predict read per image: the test split, else the validation images.
        rows, name = (splits[test_name], test_name) if test_name else (val_rows, val_name)
        self.test_dataset = DecodedImages(rows, self.eval_transform, name, self.lazy)

    def _fit_dataset(self, rows: datasets.Dataset, split: str, train: bool):
        """A training or validation dataset: held in memory where it can be, else per image."""
        transform = self.train_transform if train else self.eval_transform
        role = "training" if train else "validation"
        per_image = DecodedImages(rows, transform, split, replace_unreadable=self.lazy)
        if not self.in_memory or (self.lazy and self.in_memory == "auto"):
            return per_image  # (bad_images="lazy" replaces unreadable images as it meets them)
        # Evaluation geometry (timm's resize + centre crop) applied once; ToTensor and
        # Normalize happen on the batch (BatchAugment.normalize gives the same values).
        geometry = Compose([] if train else transform.transforms[:-2])
        try:
            dataset = InMemoryImages(rows, split, geometry)
        except NotInMemory as why:
            if self.in_memory is True:
                raise DataError(
                    f"in_memory=true cannot hold split {split!r}: {why}; set "
                    "--data.in_memory=auto (or false) to read it per image"
                ) from None
            rank_zero_info(f"Data: {role} images (split {split!r}) read per image: {why}")
            return per_image
        shape, mib = tuple(dataset.images.shape), dataset.images.nbytes / 2**20
        rank_zero_info(
            f"Data: {role} images (split {split!r}) held in memory: {shape}, {mib:.0f} MiB"
        )
        return dataset

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_source is None:
            return self.test_dataloader()
        images = unlabelled_folder(self.predict_source, self.eval_transform)
        return self._loader(images, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """In-memory batches arrive as uint8: crop, flip and normalise them here, on the device."""
        training = self.trainer is not None and self.trainer.training
        return (self.evaluation_images(batch[0], training), *batch[1:])

    def evaluation_images(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Images of a batch as the model sees them (in-memory uint8 batches augmented or
        normalised), also for callbacks that read a loader themselves (Lightning's transfer
        hooks do not run for them)."""
        if self.batch_augment is not None and images.dtype == torch.uint8:
            return self.batch_augment(images, train)
        return images

    def _loader(self, dataset: DecodedImages | InMemoryImages, train: bool) -> DataLoader:
        # Training resumes mid-epoch where it stopped: a StatefulDataLoader (its state travels
        # as this datamodule's, below). Under DDP, a RandomSampler, which Lightning replaces by
        # a DistributedSampler (one order for all ranks; the loader resumes it by position).
        distributed = self.trainer is not None and self.trainer.world_size > 1
        shuffle = RandomSampler(dataset) if distributed else ResumableShuffle(dataset)
        loader = (StatefulDataLoader if train else DataLoader)(
            dataset,
            collate_fn=_as_is if isinstance(dataset, InMemoryImages) else None,
            batch_size=self.batch_size,
            sampler=shuffle if train else None,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if train:
            if self._train_loader_state is not None:
                loader.load_state_dict(self._train_loader_state)
                self._train_loader_state = None
            self._train_loader = loader
        return loader

    # The training loader's position travels in the checkpoint with the datamodule's state:
    # Lightning restores it before the model's configure_optimizers builds the loader (its own
    # copy of the loader state is loaded only into a loader built after that).
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is None or not mid_epoch(self.trainer):
            return {}  # at an epoch's end the next epoch starts a new order
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_state = state_dict.get("train_loader")

    # -------------------------------------------------------------------------------- loading
    def _load_splits(self) -> datasets.DatasetDict:
        """All splits of the source, checked against the configured split names; memoised."""
        if self._splits is None:
            splits = self.image_source.load()
            self.num_skipped_images = self.image_source.num_skipped_images
            for name in (self.train_split, self.val_split, self.test_split):
                if name is not None and name not in splits:
                    raise ValueError(
                        f"Split {name!r} not found in {self.source!r}; available splits: "
                        f"{sorted(splits)}"
                    )
            train = splits[self.train_split]
            if len(train) == 0:
                raise ValueError(f"{self.source!r} has no images in split {self.train_split!r}")
            if _labels(train).min() < 0:
                raise ValueError(
                    f"split {self.train_split!r} of {self.source!r} has unlabelled rows"
                )
            self._splits = splits
            self._class_names = list(train.features["label"].names)
        return self._splits


def _as_is(batch):
    return batch  # InMemoryImages hands over whole batches


_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
_SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def too_few_batches(datamodule: ImageDataModule, trainer: L.Trainer, stage: str) -> str | None:
    """Why ``stage`` would run no batch of a split (too few images for a batch, or a
    ``limit_*_batches`` fraction that rounds to 0 batches), as one line with the fix, or ``None``.

    Lightning would instead train nothing and exit successfully, or fail with a traceback.
    """
    datamodule.setup(stage)
    world = max(1, trainer.world_size)
    batch = datamodule.batch_size
    for short in _STAGE_SPLITS.get(stage, ()):
        split, limit_name = _SPLIT_NAMES[short], f"limit_{short}_batches"
        dataset, limit = getattr(datamodule, f"{short}_dataset"), getattr(trainer, limit_name)
        if dataset is None or limit == 0:
            continue
        images = -(-len(dataset) // world)  # per process: a distributed sampler pads up
        batches = images // batch if short == "train" else -(-images // batch)  # drop_last
        per = f" per process ({len(dataset)} over {world})" if world > 1 else ""
        if batches == 0:
            return (
                f"the {split} split has {images} images{per}, fewer than one batch of {batch} "
                f"(--data.batch_size), so no {split} batch would run: set --data.batch_size="
                f"{max(1, images)} or less, or give the split more images"
            )
        if isinstance(limit, float) and int(batches * limit) == 0:
            return (
                f"--trainer.{limit_name}={limit} of the {batches} {split} batches ({images} "
                f"images{per}, batch {batch}) rounds down to 0 batches: set it to at least "
                f"{1 / batches:.3g}, to a number of batches (an integer), or lower "
                "--data.batch_size"
            )
    return None


def _is_labelled(split: datasets.Dataset | None) -> bool:
    """Whether a split exists and has labels (ImageNet-1k's test split has only -1)."""
    return split is not None and len(split) > 0 and _labels(split).max() >= 0


def _labels(split: datasets.Dataset) -> np.ndarray:
    return np.asarray(split.with_format("numpy")["label"])
