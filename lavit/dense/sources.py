"""Readers of dense-task annotations, normalised to one record layout, and their checks.

Detection (:class:`DetectionSplit`): COCO JSON + images (``annotations/instances_<split>.json``,
``<split>/`` or ``images/<split>/``), or a Hugging Face dataset with ``image`` and ``objects``
(``bbox``, ``category``) columns. Segmentation (image and mask pairs): ADE20K's folders
(``images/<split>/``, ``annotations/<split>/`` paired by stem), or a dataset with image and
mask columns. Images are decoded later; annotations are checked up front, so a bad file stops
the run before training with a message that names it and the fix.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image

from lavit.training.images import IMAGE_EXTENSIONS

_DECODER = datasets.Image()
BBoxFormat = Literal["xywh", "xyxy"]
DenseSourceType = Literal["auto", "demo", "coco", "folders", "hub", "parquet", "disk"]
# Boxes may stick out of the image by this many pixels (rounding in annotation tools); they are
# clipped. Further out is an annotation error.
BOX_TOLERANCE_PX = 1.0


@dataclass
class ImageRef:
    """Where an image is: a file ``path``, or row ``index`` of ``column`` in a HF dataset."""

    path: str | None = None
    dataset: datasets.Dataset | None = None
    index: int = -1
    column: str = "image"

    def __str__(self) -> str:
        return self.path or f"row {self.index} of column {self.column!r}"

    def open(self, what: str = "an image") -> PIL.Image.Image:
        """The decoded file; a ValueError naming it when it cannot be read or is empty."""
        try:
            if self.path is not None:
                image = PIL.Image.open(self.path)
            else:  # bytes or a path
                image = _DECODER.decode_example(self.dataset[self.index][self.column])
            image.load()
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{self}: cannot be read as {what} ({err})") from None
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{self}: the image is empty (0 pixels); remove it")
        return image


@dataclass
class DetectionSplit:
    """One split: per image a record of its :class:`ImageRef` (``image``), boxes (n, 4) xyxy in
    pixels, labels (0..K-1), crowd flags, annotated (height, width) or ``None`` and id."""

    name: str
    bbox_format: BBoxFormat
    class_names: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, image: ImageRef, where: str, boxes, labels, iscrowd, size, image_id) -> None:
        """Append one image, its boxes checked (:func:`check_boxes`) and made xyxy."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(labels) != len(boxes):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(labels)} categories")
        self.records.append(
            {
                "image": image,
                "boxes": check_boxes(boxes, size, where, self.bbox_format),
                "labels": np.asarray(labels, dtype=np.int64),
                "iscrowd": np.asarray(iscrowd, dtype=np.int64).reshape(-1),
                "size": size,
                "image_id": image_id,
            }
        )


SegmentationSplit = list[tuple[ImageRef, ImageRef]]  # (image, mask) pairs


# ------------------------------------------------------------------------------------ checks
def check_boxes(
    boxes: np.ndarray, size: tuple[int, int] | None, where: str, bbox_format: BBoxFormat
) -> np.ndarray:
    """Validated boxes as xyxy, clipped to the image; a ValueError names the first bad one.

    ``size`` is (height, width); when ``None`` only the box shapes are checked here (the image
    bounds are checked when the image is decoded).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    formats = {"xywh": "COCO's [x, y, width, height]", "xyxy": "[x_min, y_min, x_max, y_max]"}
    other = "xyxy" if bbox_format == "xywh" else "xywh"
    hint = (
        f"boxes are read as {formats[bbox_format]} in pixels; set data.bbox_format: {other} if "
        f"yours are {formats[other]}"
    )
    xyxy = boxes.copy()
    if bbox_format == "xywh":
        xyxy[:, 2:] += xyxy[:, :2]
    bad = {"is not finite; fix the annotation": ~np.isfinite(boxes).all(axis=1)}
    bad[f"has a negative width or height; {hint}"] = (xyxy[:, 2:] < xyxy[:, :2]).any(axis=1)
    if size is not None:
        height, width = size
        if height <= 0 or width <= 0:
            raise ValueError(
                f"{where}: the image is empty ({width}×{height} pixels); remove it or fix its "
                "width/height"
            )
        t, corner = BOX_TOLERANCE_PX, np.array([width, height])
        outside = (xyxy[:, :2] < -t).any(axis=1) | (xyxy[:, 2:] > corner + t).any(axis=1)
        bad[f"lies outside the {width}×{height} image; fix the annotation ({hint})"] = outside
    for problem, rows in bad.items():
        if rows.any():
            i = int(np.flatnonzero(rows)[0])
            raise ValueError(f"{where}: box {i} {boxes[i].tolist()} {problem}")
    if size is not None:
        xyxy = xyxy.clip(0, [size[1], size[0]] * 2)
    return xyxy.astype(np.float32)


def decode_image(ref: ImageRef, expected: tuple[int, int] | None = None) -> PIL.Image.Image:
    """The RGB image; a ValueError for an unreadable, empty or wrongly annotated image."""
    image = ref.open()
    if expected is not None and (image.height, image.width) != tuple(expected):
        raise ValueError(
            f"{ref}: the annotation says {expected[1]}×{expected[0]} but the image is "
            f"{image.width}×{image.height}; fix the annotation's width/height"
        )
    return image.convert("RGB")


def decode_mask(ref: ImageRef, image_size: tuple[int, int]) -> np.ndarray:
    """The (H, W) integer label map; a ValueError unless single-channel and of the image's size."""
    mask = ref.open("a mask image")
    if mask.mode not in ("L", "P", "I", "I;16", "1"):
        raise ValueError(
            f"{ref}: a mask must be a single-channel label image (mode L, P or I), "
            f"got mode {mask.mode}; save one class index per pixel"
        )
    if (mask.height, mask.width) != tuple(image_size):
        raise ValueError(
            f"{ref}: the mask is {mask.width}×{mask.height} but its image is "
            f"{image_size[1]}×{image_size[0]}; masks must have their image's size"
        )
    return np.asarray(mask, dtype=np.int64)


# ------------------------------------------------------------------------------------ sources
def guess_dense_source_type(source: str) -> str:
    """``demo``; a folder with COCO JSONs → ``coco``; with ``images/`` → ``folders``; a folder
    of parquet files or a ``.parquet`` glob → ``parquet``; a ``save_to_disk`` folder → ``disk``;
    ``owner/name`` → ``hub``."""
    if source == "demo":
        return "demo"
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            return "disk"
        if list(path.glob("*.parquet")) or list(path.glob("*/*.parquet")):
            return "parquet"
        if list(path.glob("annotations/*.json")):
            return "coco"
        if (path / "images").is_dir():
            return "folders"
        raise OSError(
            f"{source}: a folder, but not a dataset this reader knows: expected COCO's "
            "annotations/instances_<split>.json, ADE20K's images/<split>/ + annotations/<split>/, "
            "parquet files, or a datasets.save_to_disk folder"
        )
    if source.endswith(".parquet") or glob.has_magic(source):
        return "parquet"
    if "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return "hub"
    raise OSError(f"{source}: no such file or folder (nor a Hub dataset id owner/name)")


def load_hf_split(
    source: str,
    split: str,
    source_type: str,
    hub_config: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """One split of a Hub dataset, of local parquet files (a folder: splits named by the files,
    ``<split>-*.parquet``, ``<split>/``, ``data/...``, as datasets infers them) or of a
    ``save_to_disk`` folder."""
    if source_type == "disk":
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source}: no split {split!r} (it has {sorted(loaded)})")
            return loaded[split]
        return loaded
    if source_type == "hub":
        return datasets.load_dataset(source, name=hub_config, split=split, cache_dir=cache_dir)
    path = os.path.expanduser(source)
    files = {"data_dir": path} if Path(path).is_dir() else {"data_files": {split: path}}
    return datasets.load_dataset("parquet", **files, split=split, cache_dir=cache_dir)


def _coco_files(root: Path, split: str) -> tuple[Path, Path]:
    annotation = root / "annotations" / f"instances_{split}.json"
    if not annotation.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("*.json"))
        raise ValueError(
            f"{root}: no annotations/instances_{split}.json for split {split!r} (found {found}); "
            "set data.train_split / data.val_split to the split names"
        )
    for images in (root / split, root / "images" / split):
        if images.is_dir():
            return annotation, images
    raise ValueError(f"{root}: no image folder {split}/ or images/{split}/ for split {split!r}")


def read_coco_split(
    root: str | os.PathLike, split: str, bbox_format: BBoxFormat = "xywh"
) -> DetectionSplit:
    """A COCO instances JSON and its image folder; category ids mapped to 0..K-1 in id order."""
    annotation_file, image_dir = _coco_files(Path(root), split)
    try:
        document = json.loads(annotation_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{annotation_file}: not a readable COCO JSON ({err})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in document]
    if missing:
        raise ValueError(f"{annotation_file}: not COCO instances: no {', '.join(missing)} key")
    categories = sorted(document["categories"], key=lambda c: c["id"])
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, list[dict]] = {img["id"]: [] for img in document["images"]}
    for ann in document["annotations"]:
        for key, known, listed in (
            ("image_id", per_image, "images"),
            ("category_id", contiguous, "categories"),
        ):
            if ann[key] not in known:
                raise ValueError(
                    f"{annotation_file}: annotation {ann.get('id')} has {key} {ann[key]}, "
                    f"which is not in its {listed} list"
                )
        per_image[ann["image_id"]].append(ann)
    out = DetectionSplit(split, bbox_format, [c["name"] for c in categories])
    for img in document["images"]:
        anns = per_image[img["id"]]
        out.add(
            ImageRef(path=str(image_dir / img["file_name"])),
            f"{annotation_file.name}: image {img['id']} ({img['file_name']})",
            boxes=[a["bbox"] for a in anns],
            labels=[contiguous[a["category_id"]] for a in anns],
            iscrowd=[a.get("iscrowd", 0) for a in anns],
            size=(int(img["height"]), int(img["width"])) if "height" in img else None,
            image_id=int(img["id"]),
        )
    return out


def _require_columns(dataset: datasets.Dataset, split: str, columns: dict[str, str]) -> None:
    """A ValueError unless ``dataset`` has each column, naming the option that sets it."""
    for column, option in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"split {split!r} has no {column!r} column (columns: {dataset.column_names}); "
                f"set data.{option}"
            )


def read_hf_detection(
    dataset: datasets.Dataset,
    split: str,
    bbox_format: BBoxFormat = "xywh",
    image_column: str = "image",
    objects_column: str = "objects",
) -> DetectionSplit:
    """An HF dataset with ``image`` and ``objects`` (``bbox``, ``category``) columns."""
    _require_columns(
        dataset, split, {image_column: "image_column", objects_column: "objects_column"}
    )
    names = _category_names(dataset.features[objects_column])
    images = dataset.cast_column(image_column, datasets.Image(decode=False))
    columns = [objects_column] + [
        c for c in ("width", "height", "image_id") if c in dataset.column_names
    ]
    table = dataset.select_columns(columns).to_dict()
    out = DetectionSplit(split, bbox_format, names)
    for i, objects in enumerate(table[objects_column]):
        if isinstance(objects, list):  # a list of per-object dicts instead of a dict of lists
            objects = {k: [o[k] for o in objects] for k in (objects[0] if objects else {})}
        if "bbox" not in objects and len(objects):
            raise ValueError(
                f"split {split!r} row {i}: the {objects_column!r} column has no 'bbox' "
                f"(keys: {sorted(objects)})"
            )
        boxes = objects.get("bbox", [])
        out.add(
            ImageRef(dataset=images, index=i, column=image_column),
            f"split {split!r} row {i}",
            boxes=boxes,
            labels=objects.get("category", []),
            iscrowd=objects.get("iscrowd", [0] * len(boxes)),
            size=(int(table["height"][i]), int(table["width"][i])) if "height" in table else None,
            image_id=int(table["image_id"][i]) if "image_id" in table else i,
        )
    return out


def _category_names(feature) -> list[str]:
    """Names of the ClassLabel inside an ``objects`` feature (dict of lists or list of dicts)."""
    inner = getattr(feature, "feature", feature)  # Sequence({...}) / List({...}) → {...}
    if isinstance(inner, dict):
        category = inner.get("category")
        category = getattr(category, "feature", category)  # Sequence(ClassLabel) → ClassLabel
        if isinstance(category, datasets.ClassLabel):
            return list(category.names)
    return []


def read_mask_folder_split(root: str | os.PathLike, split: str) -> SegmentationSplit:
    """``<root>/images/<split>/*`` (or ``<root>/<split>/*``, the demo's) paired by stem with
    ``<root>/annotations/<split>/*``."""
    root = Path(root)
    image_dir, mask_dir = root / "images" / split, root / "annotations" / split
    if not image_dir.is_dir() and (root / split).is_dir():
        image_dir = root / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise ValueError(
                f"{root}: no folder {folder.relative_to(root)}/ for split {split!r}; expected "
                f"images/{split}/ and annotations/{split}/ (masks)"
            )
    images, masks = (
        {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        for folder in (image_dir, mask_dir)
    )
    if not images:
        raise ValueError(f"{image_dir}: no images")
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        name = unmatched[0]
        side = "mask" if name in images else "image"
        raise ValueError(
            f"{root}: {len(unmatched)} image/mask files have no partner (e.g. {name}: no "
            f"{side} named {name}.*); every image needs a mask with the same file stem"
        )
    return [(ImageRef(path=str(images[s])), ImageRef(path=str(masks[s]))) for s in sorted(images)]


def read_hf_segmentation(
    dataset: datasets.Dataset,
    split: str,
    image_column: str = "image",
    mask_column: str = "annotation",
) -> SegmentationSplit:
    _require_columns(dataset, split, {image_column: "image_column", mask_column: "mask_column"})
    rows = dataset.cast_column(image_column, datasets.Image(decode=False)).cast_column(
        mask_column, datasets.Image(decode=False)
    )
    return [
        (ImageRef(None, rows, i, image_column), ImageRef(None, rows, i, mask_column))
        for i in range(len(rows))
    ]
