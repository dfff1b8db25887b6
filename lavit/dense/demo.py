"""A small detection-and-segmentation set made from the embedded CIFAR-10 images (offline demo).

Each canvas (128×128 by default) has a blurred, dimmed CIFAR-10 image as background and 1–3 other
CIFAR-10 images pasted at known places and sizes (28–64 px, aspect 0.8–1.25), each cut to an
ellipse inscribed in its rectangle, none overlapping: every box (the rectangle) and mask (the
ellipse) is exact. Train canvases use the subset's train images, validation ones its test images.
Categories: CIFAR-10's super-classes ``vehicle`` and ``animal`` (each annotation keeps its
``cifar10_class``). Written in the layouts the real loaders read::

    <root>/train/000000.png ...                  images (COCO's <split>/ image folder)
    <root>/annotations/instances_train.json      COCO detection JSON (2 categories)
    <root>/annotations/train/000000.png ...      masks, ADE20K layout: 0 background, k+1 category k
    (and the same for val)

Deterministic: the same seed gives byte-identical files (``BUILD_VERSION`` names the recipe).
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import pyarrow.parquet as pq

from lavit.training.sources import embedded_dataset_dir

BUILD_VERSION = 2
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DEMO_CLASSES = ("vehicle", "animal")
VEHICLES = frozenset({"airplane", "automobile", "ship", "truck"})
DEFAULT_SIZES = {"train": 1000, "val": 200}
DONE_FILE = "BUILD_DONE"


def dense_demo_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the demo set lives: ``<cache_dir or ~/.cache/lavit>/dense_demo_v<version>``."""
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "lavit"
    return Path(base).expanduser() / f"dense_demo_v{BUILD_VERSION}"


def _load_cifar(split: str):
    """The subset's ``image(i)`` (decoded when first used: a build uses a fraction) and labels."""
    table = pq.read_table(embedded_dataset_dir() / f"{split}.parquet").to_pydict()
    encoded = [r["bytes"] for r in table["image"]]
    image = functools.cache(lambda i: PIL.Image.open(io.BytesIO(encoded[i])).convert("RGB"))
    return image, np.asarray(table["label"], dtype=np.int64)


def _place(rng: np.random.Generator, boxes: list, size: tuple[int, int], canvas: int):
    """A rectangle (x0, y0, w, h) inside the canvas overlapping no box, or None after 50 tries."""
    w, h = size
    for _ in range(50):
        x0, y0 = int(rng.integers(0, canvas - w + 1)), int(rng.integers(0, canvas - h + 1))
        if all(
            x0 >= bx + bw or bx >= x0 + w or y0 >= by + bh or by >= y0 + h
            for bx, by, bw, bh in boxes
        ):
            return x0, y0, w, h
    return None


def _canvas(rng, images, labels, canvas: int, min_side: int, max_side: int):
    """One canvas: RGB image, mask (0 background, k+1 category k), objects
    [(x, y, w, h, category, cifar10 label)]."""
    background = images(int(rng.integers(len(labels)))).resize((canvas, canvas), PIL.Image.BILINEAR)
    background = background.filter(PIL.ImageFilter.GaussianBlur(radius=canvas / 40))
    image = PIL.Image.eval(background, lambda v: int(v * 0.6))
    mask = PIL.Image.new("L", (canvas, canvas), 0)
    objects: list[tuple[int, int, int, int, int, int]] = []
    for _ in range(int(rng.integers(1, 4))):
        side = int(rng.integers(min_side, max_side + 1))
        aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        w = min(max_side, max(min_side, round(side * np.sqrt(aspect))))
        h = min(max_side, max(min_side, round(side / np.sqrt(aspect))))
        spot = _place(rng, [o[:4] for o in objects], (w, h), canvas)
        if spot is None:
            continue
        x0, y0, _, _ = spot
        index = int(rng.integers(len(labels)))
        label = int(labels[index])
        category = 0 if CIFAR10_CLASSES[label] in VEHICLES else 1
        cutout = PIL.Image.new("L", (w, h), 0)
        PIL.ImageDraw.Draw(cutout).ellipse((0, 0, w - 1, h - 1), fill=255)
        image.paste(images(index).resize((w, h), PIL.Image.BICUBIC), (x0, y0), cutout)
        mask.paste(category + 1, (x0, y0, x0 + w, y0 + h), cutout)
        objects.append((x0, y0, w, h, category, label))
    return image, mask, objects


def _write_split(root: Path, split: str, count: int, seed: int, canvas: int) -> None:
    images, labels = _load_cifar("train" if split == "train" else "test")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    (root / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    coco_images, coco_annotations = [], []
    min_side, max_side = max(8, canvas * 7 // 32), canvas // 2  # 28–64 px on a 128² canvas
    for i in range(count):
        image, mask, objects = _canvas(rng, images, labels, canvas, min_side, max_side)
        name = f"{i:06d}.png"
        image.save(root / split / name, compress_level=1)  # lossless either way; faster
        mask.save(root / "annotations" / split / name, compress_level=1)
        coco_images.append({"id": i, "file_name": name, "width": canvas, "height": canvas})
        for x0, y0, w, h, category, label in objects:
            visible = int((np.asarray(mask)[y0 : y0 + h, x0 : x0 + w] == category + 1).sum())
            coco_annotations.append(
                {
                    "id": len(coco_annotations),
                    "image_id": i,
                    "category_id": category + 1,  # COCO ids start at 1
                    "bbox": [x0, y0, w, h],
                    "area": visible,
                    "iscrowd": 0,
                    "cifar10_class": CIFAR10_CLASSES[label],
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(DEMO_CLASSES)]
    document = {"images": coco_images, "annotations": coco_annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))


def build_dense_demo(
    root: str | os.PathLike | None = None,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    canvas: int = 128,
) -> Path:
    """Build the demo set under ``root`` (default :func:`dense_demo_dir`) unless it is there.

    Written to a temporary folder beside ``root`` and renamed into place, so an interrupted build
    leaves nothing half-written behind.
    """
    root = Path(root) if root is not None else dense_demo_dir()
    if (root / DONE_FILE).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    sizes = dict(sizes or DEFAULT_SIZES)
    try:
        for split, count in sizes.items():
            _write_split(staging, split, count, seed, canvas)
        recipe = {"version": BUILD_VERSION, "seed": seed, "canvas": canvas, "sizes": sizes}
        (staging / DONE_FILE).write_text(json.dumps(recipe))
        shutil.rmtree(root, ignore_errors=True)  # a stale partial build from before
        os.replace(staging, root)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if not (isinstance(err, OSError) and (root / DONE_FILE).is_file()):
            raise  # (else another process finished the same build first)
    return root
