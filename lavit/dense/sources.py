"""Readers of dense-task annotations, normalised to one record layout, and their checks.

Detection (:class:`DetectionSplit`): COCO JSON + images (``annotations/instances_<split>.json``,
``<split>/`` or ``images/<split>/``), or a Hugging Face dataset with ``image`` and ``objects``
(``bbox``, ``category``) columns. Segmentation (:class:`SegmentationSplit`): ADE20K's folders
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
from typing import Literal

import datasets
import numpy as np
import PIL.Image

_DECODER = datasets.Image()
BBoxFormat = Literal["xywh", "xyxy"]
DenseSourceType = Literal["auto", "demo", "coco", "folders", "hub", "parquet", "disk"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Boxes may stick out of the image by this many pixels (rounding in annotation tools); they are
# clipped. Further out is an annotation error.
BOX_TOLERANCE_PX = 1.0


@dataclass
class ImageRef:
    """Where an image is: a file path, or row ``index`` of ``column`` in a HF dataset."""

    path: str | None = None
    dataset: datasets.Dataset | None = None
    index: int = -1
    column: str = "image"

    def describe(self) -> str:
        return self.path if self.path else f"row {self.index} of column {self.column!r}"

    def load(self) -> PIL.Image.Image:
        if self.path is not None:
            return PIL.Image.open(self.path)
        return _DECODER.decode_example(self.dataset[self.index][self.column])  # bytes or path


@dataclass
class DetectionSplit:
    """One split: per image its reference, boxes (n, 4) xyxy in pixels, labels, crowd flags."""

    name: str
    images: list[ImageRef]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]  # contiguous 0..K-1
    iscrowd: list[np.ndarray]
    sizes: list[tuple[int, int] | None]  # annotated (height, width), None when not given
    image_ids: list[int]
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class SegmentationSplit:
    name: str
    images: list[ImageRef]
    masks: list[ImageRef]

    def __len__(self) -> int:
        return len(self.images)


# ------------------------------------------------------------------------------------ checks
def check_boxes(
    boxes_xywh: np.ndarray, size: tuple[int, int] | None, where: str, bbox_format: BBoxFormat
) -> np.ndarray:
    """Validated boxes as xyxy, clipped to the image; a ValueError names the first bad one.

    ``size`` is (height, width); when ``None`` only the box shapes are checked here (the image
    bounds are checked when the image is decoded).
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    hint = (
        "boxes are read as COCO's [x, y, width, height] in pixels; set data.bbox_format: xyxy if "
        "yours are [x_min, y_min, x_max, y_max]"
        if bbox_format == "xywh"
        else "boxes are read as [x_min, y_min, x_max, y_max] in pixels; set data.bbox_format: "
        "xywh if yours are COCO's [x, y, width, height]"
    )
    if not np.isfinite(boxes).all():
        i = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise ValueError(f"{where}: box {i} {boxes[i].tolist()} is not finite; fix the annotation")
    xyxy = boxes.copy()
    if bbox_format == "xywh":
        xyxy[:, 2:] += xyxy[:, :2]
    negative = (xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1])
    if negative.any():
        i = int(np.flatnonzero(negative)[0])
        raise ValueError(
            f"{where}: box {i} {boxes[i].tolist()} has a negative width or height; {hint}"
        )
    if size is not None:
        height, width = size
        if height <= 0 or width <= 0:
            raise ValueError(
                f"{where}: the image is empty ({width}×{height} pixels); remove it or fix its "
                "width/height"
            )
        t = BOX_TOLERANCE_PX
        outside = (
            (xyxy[:, 0] < -t)
            | (xyxy[:, 1] < -t)
            | (xyxy[:, 2] > width + t)
            | (xyxy[:, 3] > height + t)
        )
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{where}: box {i} {boxes[i].tolist()} lies outside the {width}×{height} image; "
                f"fix the annotation ({hint})"
            )
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
    return xyxy.astype(np.float32)


def decode_image(ref: ImageRef, expected: tuple[int, int] | None = None) -> PIL.Image.Image:
    """The RGB image; a ValueError for an unreadable, empty or wrongly annotated image."""
    try:
        image = ref.load()
        image.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{ref.describe()}: cannot be read as an image ({err})") from None
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{ref.describe()}: the image is empty (0 pixels); remove it")
    if expected is not None and (image.height, image.width) != tuple(expected):
        raise ValueError(
            f"{ref.describe()}: the annotation says {expected[1]}×{expected[0]} but the image is "
            f"{image.width}×{image.height}; fix the annotation's width/height"
        )
    return image.convert("RGB")


def decode_mask(ref: ImageRef, image_size: tuple[int, int]) -> np.ndarray:
    """The (H, W) integer label map; a ValueError unless single-channel and of the image's size."""
    try:
        mask = ref.load()
        mask.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{ref.describe()}: cannot be read as a mask image ({err})") from None
    if mask.mode not in ("L", "P", "I", "I;16", "1"):
        raise ValueError(
            f"{ref.describe()}: a mask must be a single-channel label image (mode L, P or I), "
            f"got mode {mask.mode}; save one class index per pixel"
        )
    if (mask.height, mask.width) != tuple(image_size):
        raise ValueError(
            f"{ref.describe()}: the mask is {mask.width}×{mask.height} but its image is "
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
        if ann["image_id"] not in per_image:
            raise ValueError(
                f"{annotation_file}: annotation {ann.get('id')} refers to image "
                f"{ann['image_id']}, which is not in its images list"
            )
        if ann["category_id"] not in contiguous:
            raise ValueError(
                f"{annotation_file}: annotation {ann.get('id')} has category_id "
                f"{ann['category_id']}, which is not in its categories list"
            )
        per_image[ann["image_id"]].append(ann)
    out = DetectionSplit(split, [], [], [], [], [], [], [c["name"] for c in categories])
    for img in document["images"]:
        anns = per_image[img["id"]]
        size = (int(img["height"]), int(img["width"])) if "height" in img else None
        where = f"{annotation_file.name}: image {img['id']} ({img['file_name']})"
        raw = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        out.images.append(ImageRef(path=str(image_dir / img["file_name"])))
        out.boxes.append(check_boxes(raw, size, where, bbox_format))
        out.labels.append(np.array([contiguous[a["category_id"]] for a in anns], dtype=np.int64))
        out.iscrowd.append(np.array([int(a.get("iscrowd", 0)) for a in anns], dtype=np.int64))
        out.sizes.append(size)
        out.image_ids.append(int(img["id"]))
    return out


def read_hf_detection(
    dataset: datasets.Dataset,
    split: str,
    bbox_format: BBoxFormat = "xywh",
    image_column: str = "image",
    objects_column: str = "objects",
) -> DetectionSplit:
    """An HF dataset with ``image`` and ``objects`` (``bbox``, ``category``) columns."""
    for column in (image_column, objects_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"split {split!r} has no {column!r} column (columns: {dataset.column_names}); "
                "set data.image_column / data.objects_column"
            )
    names = _category_names(dataset.features[objects_column])
    images = dataset.cast_column(image_column, datasets.Image(decode=False))
    columns = [objects_column] + [
        c for c in ("width", "height", "image_id") if c in dataset.column_names
    ]
    table = dataset.select_columns(columns).to_dict()
    out = DetectionSplit(split, [], [], [], [], [], [], names)
    for i, objects in enumerate(table[objects_column]):
        if isinstance(objects, list):  # a list of per-object dicts instead of a dict of lists
            objects = {k: [o[k] for o in objects] for k in (objects[0] if objects else {})}
        if "bbox" not in objects and len(objects):
            raise ValueError(
                f"split {split!r} row {i}: the {objects_column!r} column has no 'bbox' "
                f"(keys: {sorted(objects)})"
            )
        size = None
        if "width" in table and "height" in table:
            size = (int(table["height"][i]), int(table["width"][i]))
        where = f"split {split!r} row {i}"
        raw = np.array(objects.get("bbox", []), dtype=np.float64).reshape(-1, 4)
        labels = np.array(objects.get("category", []), dtype=np.int64)
        if len(labels) != len(raw):
            raise ValueError(f"{where}: {len(raw)} boxes but {len(labels)} categories")
        out.images.append(ImageRef(dataset=images, index=i, column=image_column))
        out.boxes.append(check_boxes(raw, size, where, bbox_format))
        out.labels.append(labels)
        out.iscrowd.append(np.array(objects.get("iscrowd", [0] * len(raw)), dtype=np.int64))
        out.sizes.append(size)
        out.image_ids.append(int(table["image_id"][i]) if "image_id" in table else i)
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


def read_mask_folder_split(
    root: str | os.PathLike,
    split: str,
    images_subdir: str = "images",
    masks_subdir: str = "annotations",
) -> SegmentationSplit:
    """``<root>/<images_subdir>/<split>/*`` paired by stem with ``<root>/<masks_subdir>/<split>/*.png``."""
    root = Path(root)
    image_dir, mask_dir = root / images_subdir / split, root / masks_subdir / split
    if not image_dir.is_dir() and (root / split).is_dir():
        image_dir = root / split  # COCO-style <root>/<split>/ images (the demo's layout)
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise ValueError(
                f"{root}: no folder {folder.relative_to(root)}/ for split {split!r}; expected "
                f"{images_subdir}/{split}/ (images) and {masks_subdir}/{split}/ (masks)"
            )
    images = {
        p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
    }
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
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
    stems = sorted(images)
    return SegmentationSplit(
        split,
        [ImageRef(path=str(images[s])) for s in stems],
        [ImageRef(path=str(masks[s])) for s in stems],
    )


def read_hf_segmentation(
    dataset: datasets.Dataset,
    split: str,
    image_column: str = "image",
    mask_column: str = "annotation",
) -> SegmentationSplit:
    for column in (image_column, mask_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"split {split!r} has no {column!r} column (columns: {dataset.column_names}); "
                "set data.image_column / data.mask_column"
            )
    rows = dataset.cast_column(image_column, datasets.Image(decode=False)).cast_column(
        mask_column, datasets.Image(decode=False)
    )
    n = len(rows)
    return SegmentationSplit(
        split,
        [ImageRef(dataset=rows, index=i, column=image_column) for i in range(n)],
        [ImageRef(dataset=rows, index=i, column=mask_column) for i in range(n)],
    )
