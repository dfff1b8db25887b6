"""Image files: the check that every file of an image folder decodes (``--data.bad_images``),
and :class:`DecodedImages`, rows decoded and transformed in the DataLoader workers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import warnings
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


def image_problem(path: str) -> str | None:
    """Why the image file at ``path`` cannot be used, or ``None`` if it decodes completely."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with PIL.Image.open(path) as image:
            image.verify()  # structural checks (e.g. PNG checksums); leaves the image unusable
        with PIL.Image.open(path) as image:
            image.load()  # a full decode catches truncated data that verify() misses
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(err).__name__}: {err}"
    return None


Files = dict[str, list[tuple[str, int]]]  # split → (path, label) of each image file


def check_cache_file(source: str, cache_dir: str | None) -> Path:
    """Where the bad-image check of image folder ``source`` keeps its results: one JSON file
    under ``cache_dir``, else the Hugging Face ``datasets`` cache."""
    root = Path(cache_dir).expanduser() if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    digest = hashlib.sha1(str(Path(source).expanduser().resolve()).encode()).hexdigest()[:16]
    return root / "lavit_image_checks" / f"{digest}.json"


def _signature(path: str) -> list[int]:
    with contextlib.suppress(OSError):  # vanished or unreadable: decoding says why
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    return [-1, -1]


def check_images(paths: list[str], cache_file: Path) -> dict[str, str]:
    """``{path: why}`` for the files that do not decode completely; a file whose path, size and
    modification time are in ``cache_file`` is not decoded again."""
    known: dict[str, list] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache_file.read_text())
    signatures = {path: _signature(path) for path in paths}
    todo = [path for path in paths if known.get(path, [])[:2] != signatures[path]]
    if todo:  # decoded in threads (PIL releases the GIL), with a progress bar where it helps
        problems = thread_map(
            image_problem, todo, max_workers=min(16, 2 * (os.cpu_count() or 1)),
            desc="checking images", unit=" files", file=sys.stderr,
            disable=not sys.stderr.isatty() and len(todo) < 10_000,
        )  # fmt: skip
        for path, why in zip(todo, problems, strict=True):
            known[path] = [*signatures[path], why]
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known))
        os.replace(temporary, cache_file)  # atomically: a half-written cache is never read
    message = f"checked {len(paths)} image files: {len(todo)} decoded (cache: {cache_file})"
    if todo:  # from every process that decoded: a DDP job shows that one process per node did
        print(message, file=sys.stderr)
    else:
        rank_zero_info(message)
    return {path: known[path][2] for path in paths if known[path][2]}


def drop_bad_images(
    files: Files, source: str, policy: str, cache_dir: str | None
) -> tuple[Files, int]:
    """Apply ``--data.bad_images`` to the files of an image folder: ``error`` raises a
    ``ValueError`` listing every unreadable file, one per line; ``skip`` warns with the list
    and leaves them out; ``lazy`` checks nothing (:class:`DecodedImages` replaces them).
    Returns the files kept and how many were left out."""
    if policy == "lazy":
        return files, 0
    paths = [path for split in files.values() for path, _ in split]
    problems = check_images(paths, check_cache_file(source, cache_dir))
    if not problems:
        return files, 0
    listing = "".join(f"\n  {path}: {why}" for path, why in problems.items())
    if policy == "error":
        raise ValueError(
            f"{len(problems)} unreadable image file(s) in {source!r}:{listing}\n"
            "Fix or remove them, or set bad_images='skip' to train on the rest."
        )
    rank_zero_warn(f"Skipped {len(problems)} unreadable image file(s) in {source!r}:{listing}")
    kept = {
        split: [(p, y) for p, y in pairs if p not in problems] for split, pairs in files.items()
    }
    return kept, len(problems)


def unlabelled_folder(folder: str | Path, transform: Any) -> DecodedImages:
    """Every image file under the folder ``folder`` (sorted, any depth), label -1."""
    root = Path(folder).expanduser()
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(
            f"predict_source {str(root)!r} holds no images ({sorted(IMAGE_EXTENSIONS)})"
        )
    rows = datasets.Dataset.from_dict({"image": paths, "label": [-1] * len(paths)})
    rows = rows.cast_column("image", datasets.Image(decode=False))
    return DecodedImages(rows, transform, split="predict")


class DecodedImages(Dataset):
    """Rows of ``image`` (undecoded) and ``label``, decoded to RGB and transformed on access,
    with errors that name the image (by path, else by ``split`` and its ``row`` column, the row
    in the whole split). ``replace_unreadable`` (``bad_images="lazy"``): an image that does not
    decode is replaced by the next one, with a warning, and counted."""

    def __init__(
        self, rows: datasets.Dataset, transform: Any, split: str, replace_unreadable: bool = False
    ) -> None:
        self.rows, self.transform, self.split = rows, transform, split
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
            image = _IMAGE_DECODER.decode_example(self.rows[index]["image"])
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # avoids PIL's palette-transparency warning
            return image if image.mode == "RGB" else image.convert("RGB")
        except Exception as err:  # PIL raises many types; name the image instead
            raise ValueError(
                f"Cannot read image {self.describe(index)}: {type(err).__name__}: {err}"
            ) from None

    def item_id(self, index: int) -> str | int:
        """What names image ``index``: its file path, else its row in the whole split."""
        row = self.rows[index]
        if row["image"].get("path") and not row["image"].get("bytes"):
            return row["image"]["path"]
        return int(row.get("row", index))

    def describe(self, index: int) -> str:
        name, path = self.item_id(index), self.rows[index]["image"].get("path")
        if isinstance(name, str):
            return repr(name)  # a file on disk: its path says it all
        return f"at row {name} of split {self.split!r}" + (f" ({path})" if path else "")


# ------------------------------------------------------------------------- Pillow ≥ 13 shim
def _posterize_allowing_zero_bits(
    image: PIL.Image.Image, bits_to_keep: int, **kwargs: Any
) -> PIL.Image.Image:
    """timm's posterize, 0 bits giving a black image as in Pillow < 13: timm's ``inc1``
    RandAugment (DeiT's) asks for 0 bits at its top magnitude, which Pillow 13 refuses."""
    if bits_to_keep <= 0:
        return PIL.Image.new(image.mode, image.size)
    return timm_posterize(image, bits_to_keep, **kwargs)


def make_posterize_safe(transform: Any) -> None:
    """Swap the zero-bits-safe posterize into the auto-augment ops of a timm ``transform``."""
    for step in getattr(transform, "transforms", []):
        policy = [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
        for op in [*getattr(step, "ops", []), *policy]:  # RandAugment, AugMix; AutoAugment
            if op.aug_fn is timm_posterize:
                op.aug_fn = _posterize_allowing_zero_bits
