"""Image files and decoding: what counts as an image, which files are unreadable, lazy decoding.

* :data:`IMAGE_EXTENSIONS` and :func:`image_problem` / :func:`drop_bad_images`: the check that
  every file of an image folder decodes completely, before training starts.
* :class:`DecodedImages`: rows of a normalised dataset, decoded and transformed on access (in the
  DataLoader workers), with errors that name the image.
* :func:`make_posterize_safe`: a compatibility shim for timm's RandAugment on Pillow ≥ 13.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import Dataset
from tqdm.contrib.concurrent import thread_map

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
CHECK_CACHE_FOLDER = "lavit_image_checks"


def check_cache_file(source: str, cache_dir: str | None) -> Path:
    """Where the bad-image check of image folder ``source`` keeps its results.

    Under ``cache_dir`` (the data's ``--data.cache_dir``), else the Hugging Face ``datasets``
    cache: one JSON file per folder, keyed by each file's path, size and modification time.
    """
    root = Path(cache_dir).expanduser() if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    digest = hashlib.sha1(str(Path(source).expanduser().resolve()).encode()).hexdigest()[:16]
    return root / CHECK_CACHE_FOLDER / f"{digest}.json"


def check_images(paths: list[Path], cache_file: Path | None) -> dict[Path, str]:
    """``{path: why}`` for the files of ``paths`` that do not decode completely.

    A file whose path, size and modification time are in ``cache_file`` is not decoded again;
    the others are decoded in threads (PIL releases the GIL), with a progress bar, and the
    results written back (atomically: a half-written cache is never read).
    """
    cached: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache_file.read_text())
    results: dict[str, Any] = {}
    todo, signatures = [], []
    for path in paths:
        try:
            stat = path.stat()
            signature = [stat.st_size, stat.st_mtime_ns]
        except OSError:  # vanished or unreadable: decoding says why
            signature = [-1, -1]
        entry = cached.get(str(path))
        if entry is not None and entry[:2] == signature:
            results[str(path)] = entry
        else:
            todo.append(path)
            signatures.append(signature)
    started = time.monotonic()
    if todo:
        problems = thread_map(
            image_problem, todo, max_workers=min(16, 2 * (os.cpu_count() or 1)),
            desc="checking images", unit=" files", file=sys.stderr,
            disable=not sys.stderr.isatty() and len(todo) < 10_000,
        )  # fmt: skip
        for path, signature, why in zip(todo, signatures, problems, strict=True):
            results[str(path)] = [*signature, why]
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps({**cached, **results}))
            os.replace(temporary, cache_file)
    seconds = time.monotonic() - started
    summary = f"checked {len(paths)} image files: {len(todo)} decoded"
    if todo:  # from whichever process decodes (under DDP: local rank 0 only, the others read)
        print(
            f"{summary} ({len(todo) / max(seconds, 1e-9):.0f} files/s, {seconds:.1f} s), "
            f"{len(paths) - len(todo)} known from {cache_file}",
            file=sys.stderr,
            flush=True,
        )
    else:
        rank_zero_info(f"{summary}, all known from {cache_file}")
    return {Path(p): entry[2] for p, entry in results.items() if entry[2]}


def drop_bad_images(
    files_by_split: Files, source: str, policy: str, cache_file: Path | None = None
) -> tuple[Files, int]:
    """Check every image decodes (:func:`check_images`) and apply ``policy``.

    ``"error"``: a ``ValueError`` listing every unreadable file, one per line; ``"skip"``: the
    files without them (and a warning listing them), and how many were left out; ``"lazy"``:
    no check (unreadable files are met, counted and replaced during training, see
    :class:`DecodedImages`).
    """
    if policy == "lazy":
        return files_by_split, 0
    paths = [path for files in files_by_split.values() for path, _ in files]
    problems = check_images(paths, cache_file)
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
    """Rows of a normalised dataset (``image`` undecoded, ``label``), decoded and transformed on
    access, in the DataLoader workers, with errors that name the image.

    Args:
        rows: a dataset with an ``image`` column (``Image(decode=False)``) and a ``label`` column.
        transform: applied to the RGB ``PIL.Image``.
        split: the split's name, for error messages.
        row_ids: the rows' indices in the original split (``rows`` being a subset of it).
        replace_unreadable: an image that does not decode is replaced by the next one (with a
            warning) and counted in :attr:`unreadable_met` (``bad_images="lazy"``).
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        transform: Any,
        split: str,
        row_ids: Sequence[int] | None = None,
        replace_unreadable: bool = False,
    ) -> None:
        self.rows, self.transform, self.split, self.row_ids = rows, transform, split, row_ids
        # Shared with the DataLoader workers, which inherit it.
        self._unreadable = multiprocessing.Value("i", 0) if replace_unreadable else None

    @property
    def unreadable_met(self) -> int:
        """How many times an unreadable image was met and replaced (all workers together)."""
        return int(self._unreadable.value) if self._unreadable is not None else 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.rows)):
            at = (index + attempt) % len(self.rows)
            try:
                image = self.decode(at)
            except ValueError as err:
                if self._unreadable is None:
                    raise
                with self._unreadable.get_lock():
                    self._unreadable.value += 1
                warnings.warn(f"{err}; replaced by the next image", stacklevel=2)
                continue
            return self.transform(image), self.rows[at]["label"]
        raise ValueError(f"no image of split {self.split!r} can be read")

    def decode(self, index: int) -> PIL.Image.Image:
        """Image ``index`` as RGB; a ``ValueError`` naming it when it cannot be decoded."""
        try:
            return to_rgb(_IMAGE_DECODER.decode_example(self.rows[index]["image"]))
        except Exception as err:  # PIL raises many types; name the image instead
            raise ValueError(
                f"Cannot read image {self.describe(index)}: {type(err).__name__}: {err}"
            ) from None

    def item_id(self, index: int) -> str | int:
        """What names image ``index``: its file path, else its row in the original split."""
        encoded = self.rows[index]["image"]
        if encoded.get("path") and not encoded.get("bytes"):
            return encoded["path"]
        return int(self.row_ids[index]) if self.row_ids is not None else index

    def describe(self, index: int) -> str:
        name = self.item_id(index)
        if isinstance(name, str):
            return repr(name)  # a file on disk: its path says it all
        path = self.rows[index]["image"].get("path")
        return f"at row {name} of split {self.split!r}" + (f" ({path})" if path else "")


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
