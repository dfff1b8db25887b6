"""Where the images come from: the embedded CIFAR-10 subset, a Hub dataset, parquet files or an
image folder, each read by ``datasets`` into splits of ``image`` (undecoded) and ``label``.

A Hub token, where needed, comes from ``HF_TOKEN`` or ``hf auth login``, never from the config.
A machine names its local copies of Hub datasets in the environment, to be read instead::

    export LAVIT_LOCAL_DATASETS=uoft-cs/cifar10=../shared/data/cifar10,ILSVRC/imagenet-1k=/data/in1k

(any local ``source``; relative paths from the working directory); the config, ``run_info.json``
and W&B keep the Hub id.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import huggingface_hub
import pyarrow.parquet as pq
from lightning.pytorch.utilities import rank_zero_info
from torchvision.datasets.folder import make_dataset

from lavit.training.images import IMAGE_EXTENSIONS, drop_bad_images

SourceType = Literal["auto", "embedded", "hub", "imagefolder", "parquet"]

EMBEDDED_SOURCE = "embedded"
# Names under which a split folder or a dataset split is recognised as the validation split.
VALIDATION_SPLIT_NAMES = ("validation", "val", "valid")
SPLIT_FOLDER_NAMES = frozenset({"train", "test", *VALIDATION_SPLIT_NAMES})
HUB_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_PROBE_TIMEOUT_S = 5.0
LOCAL_DATASETS_ENV = "LAVIT_LOCAL_DATASETS"


def embedded_dataset_dir() -> Path:
    """Folder of the shipped CIFAR-10 subset (``train.parquet`` and ``test.parquet``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "cifar10_subset"


def guess_source_type(source: str) -> str:
    """The ``source_type="auto"`` rule: ``embedded``; an existing folder → parquet if it holds
    parquet files, else an image folder; a ``.parquet`` file or glob → parquet; ``owner/name``
    → Hub. Anything else is a missing path.
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


def local_copies(text: str | None = None) -> dict[str, str]:
    """``{hub id: path}`` from ``text`` (default: ``$LAVIT_LOCAL_DATASETS``), ``id=path,...``."""
    text = os.environ.get(LOCAL_DATASETS_ENV, "") if text is None else text
    copies: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        hub_id, sep, path = (part.strip() for part in entry.partition("="))
        if not (sep and hub_id and path):
            raise ValueError(
                f"{LOCAL_DATASETS_ENV}: {entry!r} is not HUB_ID=PATH (e.g. "
                "uoft-cs/cifar10=../shared/data/cifar10; entries separated by commas)"
            )
        copies[hub_id] = path
    return copies


def local_copy(source: str) -> str | None:
    """The local copy of the Hub dataset ``source`` that this machine names, if any (an error
    where the named copy does not exist, rather than a silent download)."""
    path = local_copies().get(source)
    if path is None:
        return None
    if not Path(path).expanduser().exists():
        raise ValueError(
            f"{LOCAL_DATASETS_ENV} names {path!r} as the local copy of {source}, but it does not "
            f"exist (relative to {os.getcwd()}); fix the path or remove the entry to download it"
        )
    rank_zero_info(f"Data: {source} read from its local copy {path} ({LOCAL_DATASETS_ENV})")
    return path


@dataclass
class ImageSource:
    """One image classification source; fields as the same-named ImageDataModule arguments."""

    source: str
    source_type: str
    hub_config: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    bad_images: str = "error"
    cache_dir: str | None = None
    num_skipped_images: int = field(default=0, init=False)  # by bad_images="skip", after load

    def __post_init__(self) -> None:
        embedded = self.source_type == "embedded"  # read as any parquet folder
        self.path = embedded_dataset_dir() if embedded else Path(self.source).expanduser()

    def load(self) -> datasets.DatasetDict:
        """All splits, normalised to ``image`` (undecoded) and ``label`` (one ClassLabel)."""
        if self.source_type == "imagefolder":
            return self._load_image_folder()
        if self.source_type == "hub":
            raw = self._from_hub(datasets.load_dataset)
        else:
            raw = self._load_parquet()
        features = next(iter(raw.values())).features
        image = self._pick_column(features, self.image_column, datasets.Image, "image_column")
        label = self._pick_column(features, self.label_column, datasets.ClassLabel, "label_column")
        raw = raw.select_columns([image, label]).rename_columns({image: "image", label: "label"})
        return self._as_class_labels(raw.cast_column("image", datasets.Image(decode=False)))

    def class_names(self) -> list[str] | None:
        """Class names from metadata alone, or ``None`` when only loading can tell."""
        if self.source_type == "imagefolder":
            return self._image_folder_class_names()
        if self.source_type == "hub":
            features = self._from_hub(datasets.load_dataset_builder).info.features
        else:
            files = sorted(self._parquet_files())
            if not files:
                return None
            features = datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
        if not features:
            return None
        column = self.label_column or _first_column_of_type(features, datasets.ClassLabel)
        label = features.get(column) if column else None
        return list(label.names) if isinstance(label, datasets.ClassLabel) else None

    # ----------------------------------------------------------------------- embedded, parquet
    def _parquet_files(self) -> list[str]:
        if self.path.is_dir():
            return [str(p) for p in self.path.rglob("*.parquet")]
        return glob.glob(str(self.path), recursive=True)  # a file or a glob

    def _load_parquet(self) -> datasets.DatasetDict:
        files = self._parquet_files()
        if not files:
            raise FileNotFoundError(f"No parquet file or folder matches {self.source!r}")
        if sum(pq.ParquetFile(file).metadata.num_rows for file in files) == 0:
            # Checked here: datasets would fail with an obscure "error while generating".
            raise ValueError(f"{self.source!r} has no images: its parquet files have no rows")
        # A folder's files become the splits they are named after (train.parquet, test-0000.parquet).
        path = str(self.path)
        files = {"data_dir": path} if self.path.is_dir() else {"data_files": {"train": path}}
        return datasets.load_dataset("parquet", cache_dir=self.cache_dir, **files)

    # ------------------------------------------------------------------------------------- hub
    def _from_hub(self, load: Callable) -> Any:
        """``load`` (``datasets.load_dataset`` or ``load_dataset_builder``) of the source, failing
        fast when the Hub is unreachable, with actionable messages for the Hub's errors."""
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        try:
            if not offline:  # load_dataset would retry for about half a minute
                try:
                    huggingface_hub.HfApi().dataset_info(self.source, timeout=HUB_PROBE_TIMEOUT_S)
                except huggingface_hub.errors.HfHubHTTPError:
                    pass  # the Hub answered (404, 401, ...): load_dataset says so precisely
                except Exception as err:  # the transport's error classes differ between versions
                    raise ConnectionError(err) from None
            return load(self.source, name=self.hub_config, cache_dir=self.cache_dir)
        except ConnectionError as err:
            if offline:
                raise ConnectionError(
                    f"HF_HUB_OFFLINE is set and {self.source!r} is not in the Hugging Face cache: "
                    "load it once with network access, or point `source` at a local copy."
                ) from None
            raise ConnectionError(
                f"Cannot load {self.source!r}: the Hugging Face Hub is unreachable from this "
                f"machine ({type(err).__name__}: {err}). Use a local copy (an image folder or "
                "parquet files as `source`), or set HF_HUB_OFFLINE=1 if the dataset is in the "
                "Hugging Face cache. (If it was meant as a local path, it does not exist.)"
            ) from None
        except datasets.exceptions.DatasetNotFoundError as err:
            raise FileNotFoundError(
                f"{err} If it is gated or private, accept its terms on the Hub and provide a token "
                "through the HF_TOKEN environment variable or `hf auth login`."
            ) from None

    # --------------------------------------------------------------------------- image folders
    def _image_folder_splits(self) -> dict[str, Path]:
        """Split name → folder: ``root/train``, ``root/val``, ... if present, else root is train."""
        root = self.path
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {str(root)!r} does not exist")
        subfolders = {p.name for p in _visible_subfolders(root)}
        if "train" in subfolders and subfolders <= SPLIT_FOLDER_NAMES:
            return {name: root / name for name in sorted(subfolders)}
        return {self.train_split: root}

    def _image_folder_class_names(self) -> list[str]:
        folders = self._image_folder_splits().values()
        names = sorted({p.name for folder in folders for p in _visible_subfolders(folder)})
        if not names:
            raise ValueError(
                f"Image folder {self.source!r} has no class folders (root/class/*.jpg)"
            )
        return names

    def _load_image_folder(self) -> datasets.DatasetDict:
        class_names = self._image_folder_class_names()
        files_by_split = {}
        for split, folder in self._image_folder_splits().items():
            classes = {p.name: class_names.index(p.name) for p in _visible_subfolders(folder)}
            try:  # torchvision's ImageFolder listing, with this split's classes and our labels
                files_by_split[split] = make_dataset(folder, classes, tuple(IMAGE_EXTENSIONS))
            except FileNotFoundError as err:  # "Found no valid file for the classes ..."
                raise ValueError(f"Image folder {self.source!r}, split {split!r}: {err}") from None
        files_by_split, self.num_skipped_images = drop_bad_images(
            files_by_split, self.source, self.bad_images, self.cache_dir
        )
        features = datasets.Features(
            {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=class_names)}
        )
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {"image": [p for p, _ in files], "label": [label for _, label in files]},
                    features=features,
                )
                for split, files in files_by_split.items()
            }
        )

    # ----------------------------------------------------------------------------- normalising
    def _pick_column(self, features, requested: str | None, kind: type, argument: str) -> str:
        """The requested column, else the first of the feature type, else a usual name."""
        usual = ("image", "img") if kind is datasets.Image else ("label", "labels")
        found = requested or _first_column_of_type(features, kind)
        found = found or next((name for name in usual if name in features), None)
        if found not in features:
            if requested:
                why = f"{argument}={requested!r} is not a column of {self.source!r}"
            else:
                why = f"found no {kind.__name__} column in {self.source!r}"
            columns = list(features)
            raise ValueError(f"{why}; set {argument} to one of the available columns: {columns}")
        return found

    def _as_class_labels(self, splits: datasets.DatasetDict) -> datasets.DatasetDict:
        """Cast integer or string labels to one ClassLabel shared by all splits."""
        label_feature = next(iter(splits.values())).features["label"]
        if isinstance(label_feature, datasets.ClassLabel):
            return splits
        dtype = getattr(label_feature, "dtype", "")
        values = {v for split in splits.values() for v in split.unique("label")}
        if dtype == "string":
            return splits.cast_column("label", datasets.ClassLabel(names=sorted(values)))
        if dtype.startswith(("int", "uint")):
            return splits.cast_column("label", datasets.ClassLabel(num_classes=max(values) + 1))
        raise ValueError(
            f"The label column of {self.source!r} holds {label_feature}; expected class "
            "indices or class names"
        )


def _first_column_of_type(features: datasets.Features, feature_type: type) -> str | None:
    return next((name for name, f in features.items() if isinstance(f, feature_type)), None)


def _visible_subfolders(folder: Path) -> list[Path]:
    """Sub-folders, sorted, without hidden ones (``.git``, ``.ipynb_checkpoints``)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
