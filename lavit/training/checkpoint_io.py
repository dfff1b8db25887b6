"""Checkpoint files that survive a crash and cannot run code: :class:`AtomicCheckpointIO`.

The Lightning ``CheckpointIO`` plugin the CLI installs by default:

* **writes** go to ``.<name>.partial``, are ``fsync``-ed, then ``os.replace``-d over ``<name>``:
  a process killed at any moment leaves the previous complete file or the new one, never a
  truncated ``last.ckpt``;
* a **full disk** leaves the previous files intact too, and ends in one :class:`DiskFullError`
  naming the file, the space it needed and the checkpoint to resume from;
* a checkpoint whose weights hold NaN is **refused** (:class:`NonFiniteCheckpointError`);
* **reads** are ``torch.load(weights_only=True)`` whatever the caller asks: a file that needs
  pickled code is refused before anything in it runs. Every failure is a one-line
  :class:`CheckpointError` (missing, empty, truncated, not a checkpoint, pickled objects).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lavit.errors import CheckpointError, DiskFullError, NonFiniteCheckpointError

__all__ = [
    "AtomicCheckpointIO",
    "load_checkpoint_file",
    "nan_tensors",
    "partial_path",
    "state_dict_mismatch",
]

LIGHTNING_KEYS = ("state_dict", "epoch", "global_step", "pytorch-lightning_version")


def partial_path(path: _PATH) -> Path:
    """The temporary name a checkpoint is written under before it replaces ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def nan_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Keys of the floating-point tensors of ``state_dict`` that hold a NaN (one sync per device)."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            by_device.setdefault(value.device, []).append((key, value))
    bad = []
    for items in by_device.values():
        flags = torch.stack([value.isnan().any() for _, value in items])
        if bool(flags.any()):
            bad += [key for (key, _), flag in zip(items, flags.tolist(), strict=True) if flag]
    return bad


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # a folder cannot be opened everywhere; rename is atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _first_line(text: str) -> str:
    """The first sentence of the first non-empty line (torch's messages go on for a paragraph)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line.split(". ")[0].rstrip(".")


def _load_error(path: _PATH, err: Exception) -> CheckpointError:
    message = str(err)
    forbidden = re.search(r"GLOBAL ([\w.]+)", message)
    if forbidden:
        return CheckpointError(
            f"{path}: refused, it holds pickled Python objects ({forbidden.group(1)}), not just "
            "tensors and plain values; lavit loads checkpoints weights-only, so none of it was run"
        )
    if isinstance(err, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        return CheckpointError(
            f"{path}: not a PyTorch checkpoint, or one holding pickled objects that weights-only "
            f"loading refuses ({_first_line(detail.group(1)) if detail else 'unpickling failed'})"
        )
    if "zip archive" in message or "central directory" in message or isinstance(err, EOFError):
        return CheckpointError(
            f"{path}: truncated or corrupted checkpoint file ({_first_line(message)})"
        )
    return CheckpointError(
        f"{path}: not a PyTorch checkpoint file ({type(err).__name__}: {_first_line(message)})"
    )


def load_checkpoint_file(
    path: _PATH, map_location: Any = "cpu", mmap: bool = False, lightning: bool = True
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line :class:`CheckpointError` messages.

    Args:
        path: a local checkpoint file.
        map_location: as for ``torch.load``.
        mmap: memory-map the tensors instead of reading them (cheap inspection of large files).
        lightning: also require a Lightning checkpoint (a dict with a ``state_dict``).
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    # no mmap for the legacy (non-zip) format: torch.load refuses it
    mmap = mmap and zipfile.is_zipfile(file)
    with warnings.catch_warnings():  # torch warns about the pickle protocol of garbage files
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            checkpoint = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as err:  # torch.load raises many types for a bad file
            raise _load_error(path, err) from None
    if lightning and (not isinstance(checkpoint, dict) or "state_dict" not in checkpoint):
        found = (
            f"a dict with keys {sorted(map(str, checkpoint))[:6]}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint: it holds {found}, "
            f"not {', '.join(repr(k) for k in LIGHTNING_KEYS)}"
        )
    return checkpoint


def state_dict_mismatch(
    expected: dict[str, Any], found: dict[str, Any], ignore: tuple[str, ...] = ("ema.",)
) -> str | None:
    """How ``found`` (a checkpoint's state_dict) fails to fit ``expected``, or ``None`` if it fits.

    Keys starting with ``ignore`` are left out (the module adds or drops EMA weights on load).
    """

    def shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {
            k: tuple(getattr(v, "shape", ())) for k, v in state.items() if not k.startswith(ignore)
        }

    want, have = shapes(expected), shapes(found)
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    resized = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if not (missing or unexpected or resized):
        return None
    if resized:
        key = resized[0]
        example = f"{key} is {list(have[key])} in the checkpoint, {list(want[key])} here"
    else:
        example = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
    return (
        f"{len(missing)} missing, {len(unexpected)} unexpected and {len(resized)} differently "
        f"shaped weights (e.g. {example})"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, durable writes, NaN refusal and weights-only reads.

    Lightning's own writes a file in place (a kill mid-write truncates it); remote paths
    (``s3://...``) keep them. Reads are weights-only everywhere.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        bad = nan_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteCheckpointError(_nan_message(path, bad))
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = partial_path(target)
        try:
            with open(temporary, "wb") as file:
                self.write(checkpoint, file, target)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException as err:
            temporary.unlink(missing_ok=True)
            if not isinstance(err, OSError | RuntimeError):
                raise
            buffer = io.BytesIO()  # the exact size the file needs (only after a failed write)
            torch.save(checkpoint, buffer)
            needed, free = buffer.tell(), shutil.disk_usage(target.parent).free
            # torch's zip writer reports ENOSPC as "unexpected pos": tell it by the free space
            if getattr(err, "errno", None) == errno.ENOSPC or free < needed:
                raise DiskFullError(_disk_full_message(target, needed, free)) from None
            raise
        _fsync_dir(target.parent)

    def write(self, checkpoint: dict[str, Any], file: BinaryIO, target: Path) -> None:
        """Serialise ``checkpoint`` into ``file``, the open temporary file of ``target``."""
        torch.save(checkpoint, file)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location)


def _nan_message(path: _PATH, keys: list[str]) -> str:
    return (
        f"refusing to write checkpoint {path}: {len(keys)} weight tensor(s) hold NaN "
        f"(e.g. {keys[0]}); the checkpoint already on disk is kept"
    )


def _disk_full_message(target: Path, needed: int, free: int) -> str:
    saved = [p for p in target.parent.glob("*.ckpt") if p.is_file()]
    last = target.parent / "last.ckpt"
    if last.is_file():
        resume = f"{last} is intact: make room, then resume from it with --ckpt_path last"
    elif saved:
        newest = max(saved, key=os.path.getmtime)
        resume = f"{newest} is intact: make room, then resume from it with --ckpt_path {newest}"
    else:
        resume = "no earlier checkpoint was saved: make room and start again"
    return (
        f"no space left to write checkpoint {target}: it needs about {needed / 2**20:.1f} MiB "
        f"and {free / 2**20:.1f} MiB are free there; {resume}"
    )
