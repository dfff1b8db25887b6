"""The LightningDataModule: image classification data from Hugging Face ``datasets``.

One interface for four kinds of source, chosen by ``source`` (and ``source_type``, which guesses
from the string by default):

* ``"embedded"``: a class-balanced CIFAR-10 subset shipped in ``lavit/assets`` (offline default);
* a Hub dataset id such as ``uoft-cs/cifar10`` or ``ILSVRC/imagenet-1k`` (the token, if one is
  needed, comes from ``HF_TOKEN`` or ``hf auth login``, never from the config);
* a local image folder, ``root/class_name/*.jpg``, optionally with split folders
  (``root/train/class_name/...``, ``root/val/...``);
* local parquet files (a file, a glob or a directory) in the Hugging Face ``Image`` layout.

Every source is normalised to two columns, ``image`` (encoded bytes or a path, never decoded up
front) and ``label`` (a ``ClassLabel``). Images are decoded lazily in the DataLoader workers and
transformed with timm's transform factory. Mixup/CutMix happen on the batch, in the module.
"""

import contextlib
import glob
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import datasets
import huggingface_hub
import lightning as L
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import torch
from lightning.pytorch.utilities import rank_zero_warn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import DataLoader, Dataset

from lavit.training.local_datasets import local_copy

SourceType = Literal["auto", "embedded", "hub", "imagefolder", "parquet"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]

EMBEDDED_SOURCE = "embedded"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
# Names under which a split folder or a dataset split is recognised as the validation split.
VALIDATION_SPLIT_NAMES = ("validation", "val", "valid")
SPLIT_FOLDER_NAMES = frozenset({"train", "test", *VALIDATION_SPLIT_NAMES})
HUB_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_PROBE_TIMEOUT_S = 5.0

_IMAGE_DECODER = datasets.Image()


def embedded_dataset_dir() -> Path:
    """Folder of the shipped CIFAR-10 subset (``train.parquet`` and ``test.parquet``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "cifar10_subset"


def default_num_workers() -> int:
    """A small number of DataLoader workers that fits the machine."""
    return min(4, os.cpu_count() or 1)


def guess_source_type(source: str) -> str:
    """Guess the source type of ``source`` (the ``source_type="auto"`` rule).

    ``"embedded"`` → embedded; an existing folder → parquet if it holds parquet files, otherwise an
    image folder; a ``.parquet`` file or glob → parquet; ``owner/name`` that is not a local path →
    Hub. Anything else is a missing path.
    """
    if source == EMBEDDED_SOURCE:
        return "embedded"
    path = Path(source).expanduser()
    if path.is_dir():
        # Parquet at the top or one level down (the Hub's data/train-*.parquet); not deeper, so
        # that a large image folder is not walked.
        has_parquet = next(itertools.chain(path.glob("*.parquet"), path.glob("*/*.parquet")), None)
        return "parquet" if has_parquet else "imagefolder"
    if source.endswith(".parquet"):
        return "parquet"
    if HUB_ID_PATTERN.match(source):
        return "hub"
    raise FileNotFoundError(
        f"Data source {source!r} is not an existing file or folder, nor 'embedded', nor a Hub "
        "dataset id of the form 'owner/name'."
    )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (kept, held out) with ``fraction`` of every class held out.

    Deterministic for a given ``seed``; both index arrays are sorted and disjoint. Indices are
    returned (rather than using ``Dataset.train_test_split``) so that an unreadable image can be
    reported by its row number in the original split.
    """
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        held_out.append(rng.permutation(members)[: round(fraction * len(members))])
    held_out_ids = np.sort(np.concatenate(held_out))
    kept_ids = np.setdiff1d(np.arange(len(labels)), held_out_ids)
    return kept_ids, held_out_ids


def image_problem(path: Path) -> str | None:
    """Why the image file at ``path`` cannot be used, or ``None`` if it decodes completely."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with PIL.Image.open(path) as image:
            image.verify()  # structural checks (e.g. PNG checksums); leaves the image unusable
        with PIL.Image.open(path) as image:
            image.load()  # a full decode catches truncated data that verify() misses
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(err).__name__}: {err}"
    return None


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert greyscale, RGBA, palette, CMYK, ... images to RGB."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's palette-transparency warning
    return image if image.mode == "RGB" else image.convert("RGB")


def posterize_allowing_zero_bits(
    image: PIL.Image.Image, bits_to_keep: int, **kwargs: Any
) -> PIL.Image.Image:
    """timm's posterize, with 0 bits kept giving a black image as Pillow < 13 did.

    timm's increasing-magnitude RandAugment (the ``inc1`` of the DeiT recipe) asks for 0 bits at
    its top magnitude, which Pillow 13 rejects with a ValueError that would stop training.
    """
    if bits_to_keep <= 0:
        return PIL.Image.new(image.mode, image.size)
    return timm_posterize(image, bits_to_keep, **kwargs)


def make_posterize_safe(transform: Any) -> None:
    """Swap :func:`posterize_allowing_zero_bits` into the auto-augment ops of ``transform``."""
    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))  # RandAugment, AugMix
        ops += [
            op for sub_policy in getattr(step, "policy", []) for op in sub_policy
        ]  # AutoAugment
        for op in ops:
            if op.aug_fn is timm_posterize:
                op.aug_fn = posterize_allowing_zero_bits


def hub_unreachable_message(repo_id: str, error: BaseException) -> str:
    return (
        f"Cannot load {repo_id!r}: the Hugging Face Hub is unreachable from this machine "
        f"({type(error).__name__}: {error}). Use a local copy instead (an image folder or parquet "
        "files as `source`), or, if the dataset is already in the Hugging Face cache, set "
        f"HF_HUB_OFFLINE=1 to load it from there. (If {repo_id!r} was meant as a local path, it "
        "does not exist.)"
    )


def check_hub_reachable(repo_id: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds if the Hub cannot be reached.

    ``load_dataset`` retries a failed connection with back-off for about half a minute; one
    quick metadata request first makes an offline machine fail fast instead.
    """
    try:
        huggingface_hub.HfApi().dataset_info(repo_id, timeout=timeout)
    except huggingface_hub.errors.HfHubHTTPError:
        return  # the Hub answered (404, 401, ...): load_dataset reports that precisely
    except (
        Exception
    ) as err:  # the transport's error classes differ between huggingface_hub versions
        raise ConnectionError(hub_unreachable_message(repo_id, err)) from None


class DecodedImages(Dataset):
    """Rows of a normalised Hugging Face dataset, decoded and transformed on access.

    The ``image`` column holds encoded bytes or a file path; decoding happens here, in the
    DataLoader worker, so the whole dataset is never decoded up front.

    Args:
        rows: a dataset with an ``image`` column (``Image(decode=False)``) and a ``label`` column.
        transform: applied to the RGB ``PIL.Image``; returns a tensor.
        split: the split's name, for error messages.
        row_ids: the rows' indices in the original split (when ``rows`` is a subset of it),
            for error messages.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        transform: Any,
        split: str,
        row_ids: Sequence[int] | None = None,
    ) -> None:
        self.rows = rows
        self.transform = transform
        self.split = split
        self.row_ids = row_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        return self.transform(self._decode(row["image"], index)), row["label"]

    def _decode(self, encoded: dict[str, Any], index: int) -> PIL.Image.Image:
        try:
            return to_rgb(_IMAGE_DECODER.decode_example(encoded))
        except Exception as err:  # PIL raises many types; name the image instead
            raise ValueError(
                f"Cannot read image {self._describe(encoded, index)}: {type(err).__name__}: {err}"
            ) from None

    def _describe(self, encoded: dict[str, Any], index: int) -> str:
        path = encoded.get("path")
        if path and not encoded.get("bytes"):
            return repr(path)  # a file on disk: its path says it all
        row = int(self.row_ids[index]) if self.row_ids is not None else index
        return f"at row {row} of split {self.split!r}" + (f" ({path})" if path else "")


class ImageDataModule(L.LightningDataModule):
    """Image classification data from the Hub, an image folder, parquet files or the embedded set.

    Args:
        source: ``"embedded"`` (a shipped 4,000/1,000-image CIFAR-10 subset), a Hub dataset id
            (``owner/name``), an image folder (``root/class/*.jpg``, optionally with split folders
            ``root/train``, ``root/val``, ``root/test``), or parquet files (a file, a glob or a
            folder; files named after splits, like ``train.parquet``, become those splits).
        source_type: how to read ``source``; ``"auto"`` guesses from the string.
        hub_config: the configuration name of a Hub dataset that has several.
        image_column: column holding the images; default: the first ``Image`` feature, else a
            column named ``image`` or ``img``.
        label_column: column holding the labels; default: the first ``ClassLabel`` feature, else
            a column named ``label`` or ``labels``.
        train_split: name of the training split.
        val_split: name of the validation split (e.g. ``"test"``); default: a split named
            ``validation``, ``val`` or ``valid`` if there is one, else ``val_fraction`` of the
            training split, held out per class with ``seed``.
        test_split: name of the split for testing and prediction; default: ``test`` if it exists
            and is labelled, else the validation data.
        val_fraction: fraction of the training split held out for validation when there is no
            validation split.
        seed: seed of the held-out validation draw.
        img_size: side of the square images fed to the model.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation for normalisation.
        crop_pct: evaluation crop: resize to ``img_size / crop_pct`` then centre-crop ``img_size``
            (use 1.0 for images already at ``img_size``, e.g. 32×32 CIFAR at ``img_size=32``).
        interpolation: resampling filter for resizing (training and evaluation).
        scale: area range of the training random-resized crop.
        ratio: aspect-ratio range of the training random-resized crop.
        hflip: probability of a horizontal flip in training.
        vflip: probability of a vertical flip in training.
        color_jitter: colour-jitter strength in training (timm ignores it when ``auto_augment``
            is a RandAugment policy); ``None`` disables it.
        auto_augment: timm auto-augment policy string (e.g. ``"rand-m9-mstd0.5-inc1"``,
            ``"augmix-m5-w4-d2"``); ``None`` disables it.
        re_prob: random-erasing probability in training; 0 disables it.
        re_mode: random-erasing fill mode.
        re_count: number of random-erasing regions.
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes; default ``min(4, number of CPUs)``.
        pin_memory: pin batches in page-locked memory; default: when CUDA is available.
        bad_images: for image folders, what to do with files that cannot be decoded: ``"error"``
            lists them all and stops, ``"skip"`` leaves them out with a warning.
        cache_dir: Hugging Face ``datasets`` cache folder; default: the library's.

    Attributes:
        num_classes: number of classes (readable before ``setup``).
        class_names: the class names, in label order (readable before ``setup``).
        num_skipped_images: image-folder files left out by ``bad_images="skip"``.
        train_dataset, val_dataset, test_dataset: the torch datasets, after ``setup``.
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
        val_fraction: float = 0.1,
        seed: int = 0,
        img_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        crop_pct: float = 0.875,
        interpolation: Interpolation = "bicubic",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter: float | None = 0.4,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: Literal["const", "rand", "pixel"] = "pixel",
        re_count: int = 1,
        batch_size: int = 128,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        bad_images: Literal["error", "skip"] = "error",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if source_type in ("auto", "hub") and (copy := local_copy(source)) is not None:
            source, source_type = copy, "auto"  # this machine's copy of a Hub dataset
        self.source = source
        self.source_type = guess_source_type(source) if source_type == "auto" else source_type
        self.hub_config = hub_config
        self.image_column = image_column
        self.label_column = label_column
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.bad_images = bad_images
        self.cache_dir = cache_dir
        # Built here so that a bad augmentation setting fails when the config is read.
        self.train_transform = create_transform(
            input_size=img_size,
            is_training=True,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            vflip=vflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            interpolation=interpolation,
            mean=mean,
            std=std,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
        )
        make_posterize_safe(self.train_transform)
        self.eval_transform = create_transform(
            input_size=img_size,
            is_training=False,
            interpolation=interpolation,
            mean=mean,
            std=std,
            crop_pct=crop_pct,
        )
        self.num_skipped_images = 0
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
            self._class_names = self._peek_class_names()
        if self._class_names is None:
            self._class_names = list(self._load_splits()[self.train_split].features["label"].names)
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _peek_class_names(self) -> list[str] | None:
        """Class names without loading the data, or ``None`` when only loading can tell."""
        if self.source_type == "imagefolder":
            return self._image_folder_class_names()
        if self.source_type == "hub":
            with self._hub_access():
                builder = datasets.load_dataset_builder(
                    self.source, name=self.hub_config, cache_dir=self.cache_dir
                )
            return self._class_names_from_features(builder.info.features)
        files = sorted(self._parquet_files())
        if not files:
            return None
        schema = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
        return self._class_names_from_features(schema)

    def _class_names_from_features(self, features: datasets.Features | None) -> list[str] | None:
        if not features:
            return None
        column = self.label_column or _first_column_of_type(features, datasets.ClassLabel)
        label = features.get(column) if column else None
        return list(label.names) if isinstance(label, datasets.ClassLabel) else None

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
            self.train_dataset = DecodedImages(train_rows, self.train_transform, self.train_split)
            self.val_dataset = DecodedImages(splits[val_name], self.eval_transform, val_name)
        else:
            labels = _labels(train_rows)
            kept, held_out = stratified_split(labels, self.val_fraction, self.seed)
            if len(held_out) == 0:
                raise ValueError(
                    f"val_fraction={self.val_fraction} of the {len(labels)} training images "
                    "leaves no validation images; raise it or set val_split"
                )
            self.train_dataset = DecodedImages(
                train_rows.select(kept), self.train_transform, self.train_split, kept
            )
            self.val_dataset = DecodedImages(
                train_rows.select(held_out), self.eval_transform, self.train_split, held_out
            )
        test_name = self.test_split or ("test" if _is_labelled(splits.get("test")) else None)
        self.test_dataset = (
            DecodedImages(splits[test_name], self.eval_transform, test_name)
            if test_name
            else self.val_dataset
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.train_dataset), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_dataset), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_dataset), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _require(self, dataset: DecodedImages | None) -> DecodedImages:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a DataLoader")
        return dataset

    def _loader(self, dataset: DecodedImages, train: bool) -> DataLoader:
        # Plain DataLoaders: under DDP Lightning swaps in a DistributedSampler itself.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    # -------------------------------------------------------------------------------- loading
    def _load_splits(self) -> datasets.DatasetDict:
        """All splits, normalised to ``image`` (undecoded) and ``label`` (ClassLabel); memoised."""
        if self._splits is None:
            loaders = {
                "embedded": self._load_embedded,
                "hub": self._load_hub,
                "imagefolder": self._load_image_folder,
                "parquet": self._load_parquet,
            }
            splits = self._normalise(loaders[self.source_type]())
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

    def _load_embedded(self) -> datasets.DatasetDict:
        folder = embedded_dataset_dir()
        data_files = {split: str(folder / f"{split}.parquet") for split in ("train", "test")}
        return datasets.load_dataset("parquet", data_files=data_files, cache_dir=self.cache_dir)

    def _parquet_files(self) -> list[str]:
        if self.source_type == "embedded":
            return [str(embedded_dataset_dir() / "train.parquet")]
        path = Path(self.source).expanduser()
        if path.is_dir():
            return [str(p) for p in path.rglob("*.parquet")]
        if glob.has_magic(self.source):
            return glob.glob(os.path.expanduser(self.source), recursive=True)
        return [str(path)] if path.is_file() else []

    def _load_parquet(self) -> datasets.DatasetDict:
        path = Path(self.source).expanduser()
        files = self._parquet_files()
        if not files:
            kind = "files matching" if glob.has_magic(self.source) else "parquet file or folder"
            raise FileNotFoundError(f"No {kind} {self.source!r}")
        if sum(pq.ParquetFile(file).metadata.num_rows for file in files) == 0:
            # Checked here: datasets would fail with an obscure "corresponds to no data".
            raise ValueError(f"{self.source!r} has no images: its parquet files have no rows")
        if path.is_dir():
            # datasets infers the splits from the file names (train.parquet, test-0000.parquet, ...).
            return datasets.load_dataset("parquet", data_dir=str(path), cache_dir=self.cache_dir)
        return datasets.load_dataset(
            "parquet",
            data_files={"train": os.path.expanduser(self.source)},
            cache_dir=self.cache_dir,
        )

    def _load_hub(self) -> datasets.DatasetDict:
        with self._hub_access():
            return datasets.load_dataset(
                self.source, name=self.hub_config, cache_dir=self.cache_dir
            )

    @contextlib.contextmanager
    def _hub_access(self) -> Iterator[None]:
        """Fail fast when the Hub is unreachable, and turn Hub errors into actionable messages."""
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        if not offline:
            check_hub_reachable(self.source)
        try:
            yield
        except ConnectionError as err:
            if offline:
                raise ConnectionError(
                    f"HF_HUB_OFFLINE is set and {self.source!r} is not in the Hugging Face cache: "
                    "load it once with network access, or point `source` at a local copy."
                ) from None
            raise ConnectionError(hub_unreachable_message(self.source, err)) from None
        except datasets.exceptions.DatasetNotFoundError as err:
            raise FileNotFoundError(
                f"{err} If it is gated or private, accept its terms on the Hub and provide a token "
                "through the HF_TOKEN environment variable or `hf auth login`."
            ) from None

    # ------------------------------------------------------------------------- image folders
    def _image_folder_root(self) -> Path:
        root = Path(self.source).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {str(root)!r} does not exist")
        return root

    def _image_folder_splits(self) -> dict[str, Path]:
        """Split name → folder: ``root/train``, ``root/val``, ... if present, else root is train."""
        root = self._image_folder_root()
        subfolders = {p.name for p in _visible_subfolders(root)}
        if "train" in subfolders and subfolders <= SPLIT_FOLDER_NAMES:
            return {name: root / name for name in sorted(subfolders)}
        return {self.train_split: root}

    def _image_folder_class_names(self) -> list[str]:
        names = {
            p.name
            for folder in self._image_folder_splits().values()
            for p in _visible_subfolders(folder)
        }
        if not names:
            raise ValueError(
                f"Image folder {self.source!r} has no class folders (expected root/class_name/*.jpg)"
            )
        return sorted(names)

    def _load_image_folder(self) -> datasets.DatasetDict:
        class_names = self._image_folder_class_names()
        files_by_split: dict[str, list[tuple[Path, int]]] = {}
        empty_classes = []
        for split, folder in self._image_folder_splits().items():
            files_by_split[split] = []
            for class_folder in _visible_subfolders(folder):
                images = sorted(
                    p for p in class_folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                )
                if not images:
                    empty_classes.append(str(class_folder))
                label = class_names.index(class_folder.name)
                files_by_split[split] += [(p, label) for p in images]
        if empty_classes:
            raise ValueError(
                f"No images (extensions {sorted(IMAGE_EXTENSIONS)}) in class folder(s): "
                + ", ".join(empty_classes)
            )
        files_by_split = self._drop_bad_images(files_by_split)
        features = datasets.Features(
            {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=class_names)}
        )
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {"image": [str(p) for p, _ in files], "label": [label for _, label in files]},
                    features=features,
                )
                for split, files in files_by_split.items()
            }
        )

    def _drop_bad_images(
        self, files_by_split: dict[str, list[tuple[Path, int]]]
    ) -> dict[str, list[tuple[Path, int]]]:
        """Check every image decodes (in threads: PIL releases the GIL); apply ``bad_images``."""
        paths = [path for files in files_by_split.values() for path, _ in files]
        with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
            problems = {
                p: why for p, why in zip(paths, pool.map(image_problem, paths), strict=True) if why
            }
        if not problems:
            return files_by_split
        if self.bad_images == "error":
            listing = "\n".join(f"  {path}: {why}" for path, why in problems.items())
            raise ValueError(
                f"{len(problems)} unreadable image file(s) in {self.source!r}:\n{listing}\n"
                "Fix or remove them, or set bad_images='skip' to train on the rest."
            )
        self.num_skipped_images = len(problems)
        listing = "".join(f"\n  {path}: {why}" for path, why in problems.items())
        rank_zero_warn(
            f"Skipped {len(problems)} unreadable image file(s) in {self.source!r}:{listing}"
        )
        return {
            split: [(p, label) for p, label in files if p not in problems]
            for split, files in files_by_split.items()
        }

    # ---------------------------------------------------------------------------- normalising
    def _normalise(self, raw: datasets.DatasetDict) -> datasets.DatasetDict:
        """Keep the image and label columns as ``image`` (undecoded) and ``label`` (ClassLabel)."""
        if not raw:
            raise ValueError(f"{self.source!r} has no splits")
        features = next(iter(raw.values())).features
        image_column = self._pick_column(
            features, self.image_column, datasets.Image, ("image", "img"), "image_column"
        )
        label_column = self._pick_column(
            features, self.label_column, datasets.ClassLabel, ("label", "labels"), "label_column"
        )
        splits = datasets.DatasetDict(
            {
                name: split.select_columns([image_column, label_column])
                .rename_columns({image_column: "image", label_column: "label"})
                .cast_column("image", datasets.Image(decode=False))
                for name, split in raw.items()
            }
        )
        return self._as_class_labels(splits)

    def _pick_column(
        self,
        features: datasets.Features,
        requested: str | None,
        feature_type: type,
        fallback_names: tuple[str, ...],
        argument: str,
    ) -> str:
        available = list(features)
        if requested is not None:
            if requested not in features:
                raise ValueError(
                    f"{argument}={requested!r} is not a column of {self.source!r}; "
                    f"available columns: {available}"
                )
            return requested
        found = _first_column_of_type(features, feature_type) or next(
            (name for name in fallback_names if name in features), None
        )
        if found is None:
            raise ValueError(
                f"Found no {feature_type.__name__} column in {self.source!r}; set {argument} to "
                f"one of the available columns: {available}"
            )
        return found

    def _as_class_labels(self, splits: datasets.DatasetDict) -> datasets.DatasetDict:
        """Cast integer or string labels to one ClassLabel shared by all splits."""
        label_feature = next(iter(splits.values())).features["label"]
        if isinstance(label_feature, datasets.ClassLabel):
            return splits
        dtype = getattr(label_feature, "dtype", None)
        values = [v for split in splits.values() for v in split.unique("label")]
        if dtype == "string":
            class_label = datasets.ClassLabel(names=sorted(set(values)))
        elif dtype is not None and dtype.startswith(("int", "uint")):
            class_label = datasets.ClassLabel(num_classes=max(values) + 1)
        else:
            raise ValueError(
                f"The label column of {self.source!r} holds {label_feature}; expected class "
                "indices or class names"
            )
        return splits.cast_column("label", class_label)


def _first_column_of_type(features: datasets.Features, feature_type: type) -> str | None:
    return next((name for name, f in features.items() if isinstance(f, feature_type)), None)


def _visible_subfolders(folder: Path) -> list[Path]:
    """Sub-folders, sorted, without hidden ones (``.git``, ``.ipynb_checkpoints``)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_labelled(split: datasets.Dataset | None) -> bool:
    """Whether a split exists and has labels (ImageNet-1k's test split has only -1)."""
    return split is not None and len(split) > 0 and _labels(split).max() >= 0


def _labels(split: datasets.Dataset) -> np.ndarray:
    return np.asarray(split.with_format("numpy")["label"])
