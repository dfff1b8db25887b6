"""Image files and decoding: what counts as an image, which files are unreadable, lazy decoding.

* :data:`IMAGE_EXTENSIONS` and :func:`image_problem` / :func:`drop_bad_images`: the check that
  every file of an image folder decodes completely, before training starts.
* :class:`DecodedImages`: rows of a normalised dataset, decoded and transformed on access (in the
  DataLoader workers), with errors that name the image.
* :func:`make_posterize_safe`: a compatibility shim for timm's RandAugment on Pillow ≥ 13.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch
from lightning.pytorch.utilities import rank_zero_warn
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodedImages",
    "drop_bad_images",
    "image_problem",
    "make_posterize_safe",
    "to_rgb",
    "unlabelled_folder",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

_IMAGE_DECODER = datasets.Image()


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


Files = dict[str, list[tuple[Path, int]]]


def drop_bad_images(files_by_split: Files, source: str, policy: str) -> tuple[Files, int]:
    """Check every image decodes (in threads: PIL releases the GIL) and apply ``policy``.

    ``"error"``: a ``ValueError`` listing every unreadable file, one per line; ``"skip"``: the
    files without them (and a warning listing them), and how many were left out.
    """
    paths = [path for files in files_by_split.values() for path, _ in files]
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        problems = {
            p: why for p, why in zip(paths, pool.map(image_problem, paths), strict=True) if why
        }
    if not problems:
        return files_by_split, 0
    if policy == "error":
        listing = "\n".join(f"  {path}: {why}" for path, why in problems.items())
        raise ValueError(
            f"{len(problems)} unreadable image file(s) in {source!r}:\n{listing}\n"
            "Fix or remove them, or set bad_images='skip' to train on the rest."
        )
    listing = "".join(f"\n  {path}: {why}" for path, why in problems.items())
    rank_zero_warn(f"Skipped {len(problems)} unreadable image file(s) in {source!r}:{listing}")
    kept = {
        split: [(p, label) for p, label in files if p not in problems]
        for split, files in files_by_split.items()
    }
    return kept, len(problems)


def unlabelled_folder(folder: str | Path, transform: Any) -> DecodedImages:
    """Every image file under ``folder`` (sorted, any depth), label -1, for prediction."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"predict_source {str(root)!r} is not a folder")
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(
            f"predict_source {str(root)!r} holds no images ({sorted(IMAGE_EXTENSIONS)})"
        )
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.Value("int64")}
    )
    rows = datasets.Dataset.from_dict(
        {"image": [{"path": p, "bytes": None} for p in paths], "label": [-1] * len(paths)},
        features=features,
    )
    return DecodedImages(rows, transform, split="predict")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert greyscale, RGBA, palette, CMYK, ... images to RGB."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's palette-transparency warning
    return image if image.mode == "RGB" else image.convert("RGB")


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

    def item_id(self, index: int) -> str | int:
        """What names image ``index``: its file path, else its row in the original split."""
        encoded = self.rows[index]["image"]
        if encoded.get("path") and not encoded.get("bytes"):
            return encoded["path"]
        return int(self.row_ids[index]) if self.row_ids is not None else index

    def _describe(self, encoded: dict[str, Any], index: int) -> str:
        path = encoded.get("path")
        if path and not encoded.get("bytes"):
            return repr(path)  # a file on disk: its path says it all
        row = int(self.row_ids[index]) if self.row_ids is not None else index
        return f"at row {row} of split {self.split!r}" + (f" ({path})" if path else "")


# ------------------------------------------------------------------------- Pillow ≥ 13 shim
def _posterize_allowing_zero_bits(
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
    """Swap the zero-bits-safe posterize into the auto-augment ops of a timm ``transform``."""
    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))  # RandAugment, AugMix
        ops += [
            op for sub_policy in getattr(step, "policy", []) for op in sub_policy
        ]  # AutoAugment
        for op in ops:
            if op.aug_fn is timm_posterize:
                op.aug_fn = _posterize_allowing_zero_bits
