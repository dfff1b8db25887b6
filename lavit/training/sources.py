"""Where the images come from: four kinds of source, read into one layout.

* ``"embedded"``: a class-balanced CIFAR-10 subset shipped in ``lavit/assets`` (offline default);
* a Hub dataset id such as ``uoft-cs/cifar10`` or ``ILSVRC/imagenet-1k`` (the token, if one is
  needed, comes from ``HF_TOKEN`` or ``hf auth login``, never from the config);
* a local image folder, ``root/class_name/*.jpg``, optionally with split folders
  (``root/train/class_name/...``, ``root/val/...``);
* local parquet files (a file, a glob or a directory) in the Hugging Face ``Image`` layout.

:meth:`ImageSource.load` normalises every source to splits of two columns, ``image`` (encoded
bytes or a path, never decoded here) and ``label`` (one ``ClassLabel`` for all splits).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import huggingface_hub
import pyarrow.parquet as pq

from lavit.training.images import IMAGE_EXTENSIONS, check_cache_file, drop_bad_images

SourceType = Literal["auto", "embedded", "hub", "imagefolder", "parquet"]

EMBEDDED_SOURCE = "embedded"
# Names under which a split folder or a dataset split is recognised as the validation split.
VALIDATION_SPLIT_NAMES = ("validation", "val", "valid")
SPLIT_FOLDER_NAMES = frozenset({"train", "test", *VALIDATION_SPLIT_NAMES})
HUB_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_PROBE_TIMEOUT_S = 5.0


def embedded_dataset_dir() -> Path:
    """Folder of the shipped CIFAR-10 subset (``train.parquet`` and ``test.parquet``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "cifar10_subset"


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


def _hub_unreachable_message(repo_id: str, error: BaseException) -> str:
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
    except Exception as err:  # the transport's error classes differ between hub versions
        raise ConnectionError(_hub_unreachable_message(repo_id, err)) from None


@dataclass
class ImageSource:
    """One image classification source, read as splits of ``image`` and ``label``.

    Fields: as the same-named arguments of :class:`lavit.training.data.ImageDataModule`
    (``source_type`` resolved from ``"auto"``); ``num_skipped_images``: image-folder files left
    out by ``bad_images="skip"`` (after ``load``).
    """

    source: str
    source_type: str
    hub_config: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    bad_images: str = "error"
    cache_dir: str | None = None
    num_skipped_images: int = field(default=0, init=False)

    def load(self) -> datasets.DatasetDict:
        """All splits, normalised to ``image`` (undecoded) and ``label`` (ClassLabel)."""
        readers = {
            "embedded": self._load_parquet,
            "hub": self._load_hub,
            "imagefolder": self._load_image_folder,
            "parquet": self._load_parquet,
        }
        return self._normalise(readers[self.source_type]())

    def class_names(self) -> list[str] | None:
        """Class names from metadata alone, or ``None`` when only loading can tell."""
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

    # ------------------------------------------------------------------ embedded, parquet, hub
    @property
    def _path(self) -> Path:
        return embedded_dataset_dir() if self.source_type == "embedded" else Path(self.source)

    def _parquet_files(self) -> list[str]:
        path = self._path.expanduser()
        if path.is_dir():
            return [str(p) for p in path.rglob("*.parquet")]
        if glob.has_magic(self.source):
            return glob.glob(os.path.expanduser(self.source), recursive=True)
        return [str(path)] if path.is_file() else []

    def _load_parquet(self) -> datasets.DatasetDict:
        path = self._path.expanduser()
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
            raise ConnectionError(_hub_unreachable_message(self.source, err)) from None
        except datasets.exceptions.DatasetNotFoundError as err:
            raise FileNotFoundError(
                f"{err} If it is gated or private, accept its terms on the Hub and provide a token "
                "through the HF_TOKEN environment variable or `hf auth login`."
            ) from None

    # --------------------------------------------------------------------------- image folders
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
        files_by_split, self.num_skipped_images = drop_bad_images(
            files_by_split,
            self.source,
            self.bad_images,
            check_cache_file(self.source, self.cache_dir),
        )
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

    # ----------------------------------------------------------------------------- normalising
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
